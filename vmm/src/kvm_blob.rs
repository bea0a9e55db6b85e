//! KVM's large state structs (XSAVE area, LAPIC page, irqchips, PIT) in
//! the machine state as compact hex strings, trailing zero bytes left out.
//!
//! kvm-bindings serializes them as RON byte strings, where each zero byte
//! is four characters (`\x00`): 45 KB for a one-vCPU machine, and decoding
//! that is most of a migration's downtime. As hex they are a third of it,
//! and a RON string without escapes decodes at memchr speed. Use with
//! `#[serde(with = "crate::kvm_blob")]` (or `kvm_blob::option`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A plain C struct that KVM fills completely: `#[repr(C)]`, no implicit
/// padding, every bit pattern valid.
///
/// # Safety
/// Implement only for such types (bindgen structs of the KVM ABI whose
/// padding is explicit), so that viewing one as bytes reads only
/// initialized memory and any bytes of the right length form a valid value.
pub unsafe trait Pod: Default {}

// SAFETY: each is a bindgen `#[repr(C)]` struct of the KVM ABI made of
// integers and integer arrays, with explicit `pad` fields where the C
// struct has gaps; KVM writes every byte of them.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above (1 KiB register page).
unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above (chip_id, explicit pad, a 512-byte union of arrays).
unsafe impl Pod for kvm_bindings::kvm_irqchip {}
// SAFETY: as above (three channel states laid out without gaps, flags,
// reserved words).
unsafe impl Pod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above (eighteen u64 registers).
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: as above (segments and descriptor tables with their explicit
// `padding` fields, u64 control registers, the interrupt bitmap).
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: as above (u8 fields grouped in fours, explicit `pad` and
// `reserved` bytes, the u64 payload at offset 56).
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above (u64 registers, flags, reserved words).
unsafe impl Pod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above (u32 count and flags, 16-byte entries with an explicit
// reserved word, u64 padding).
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above (one u32).
unsafe impl Pod for kvm_bindings::kvm_mp_state {}

// The KVM ABI sizes: a gap the bindings left implicit would show here.
const _: () = {
    assert!(size_of::<kvm_bindings::kvm_regs>() == 144);
    assert!(size_of::<kvm_bindings::kvm_sregs>() == 312);
    assert!(size_of::<kvm_bindings::kvm_vcpu_events>() == 64);
    assert!(size_of::<kvm_bindings::kvm_debugregs>() == 128);
    assert!(size_of::<kvm_bindings::kvm_xcrs>() == 392);
    assert!(size_of::<kvm_bindings::kvm_mp_state>() == 4);
};

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no uninitialized bytes; the slice borrows `v`
    // for its lifetime and covers exactly its size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn bytes_of_mut<T: Pod>(v: &mut T) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and any bytes written form a valid `T:
    // Pod`; the slice borrows `v` mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut((v as *mut T).cast::<u8>(), size_of::<T>()) }
}

/// Each byte's two lowercase hex digits (a table: this runs inside a
/// migration's pause, over ~4 KB per vCPU).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    t
};

/// Each character's value as a lowercase hex digit, or 0xff.
const NIBBLES: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// `bytes` as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(2 * bytes.len());
    for &b in bytes {
        out.extend_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Fills `dst` from the lowercase hex `h` (two characters per byte, as
/// many bytes as `h` holds); `None` on any other character.
fn unhex(dst: &mut [u8], h: &[u8]) -> Option<()> {
    for (d, pair) in dst.iter_mut().zip(h.chunks_exact(2)) {
        let (hi, lo) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
        if (hi | lo) == 0xff {
            return None;
        }
        *d = (hi << 4) | lo;
    }
    Some(())
}

/// Whether two values are the same bytes.
pub fn same<T: Pod>(a: &T, b: &T) -> bool {
    bytes_of(a) == bytes_of(b)
}

fn encode<T: Pod>(v: &T) -> String {
    let b = bytes_of(v);
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    hex(&b[..end])
}

/// Decodes `s` into a zeroed `T`; `None` when it is not lowercase hex of
/// at most `size_of::<T>()` bytes.
fn decode<T: Pod>(s: &str) -> Option<T> {
    let h = s.as_bytes();
    if !h.len().is_multiple_of(2) || h.len() / 2 > size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    unhex(bytes_of_mut(&mut v), h)?;
    Some(v)
}

pub fn serialize<T: Pod, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    encode(v).serialize(s)
}

/// Reads the hex string in place (RON lends it when it has no escapes,
/// as written), where `String::deserialize` would copy it.
struct Hex<T>(std::marker::PhantomData<T>);

impl<T: Pod> serde::de::Visitor<'_> for Hex<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lowercase hex of at most {} bytes", size_of::<T>())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        decode(s).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(s), &self))
    }
}

pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_str(Hex(std::marker::PhantomData))
}

/// The same for an optional struct.
pub mod option {
    use super::*;

    pub fn serialize<T: Pod, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(encode).serialize(s)
    }

    struct Present<T>(T);

    impl<'de, T: Pod> Deserialize<'de> for Present<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::deserialize(d).map(Present)
        }
    }

    pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        Ok(Option::<Present<T>>::deserialize(d)?.map(|s| s.0))
    }
}

/// A struct written as hex since format 1.2, read as hex or in the
/// named-field form formats 1.0 and 1.1 wrote (`(rax:1,rbx:0,...)`).
pub mod either {
    use super::*;
    use serde::de::value::{BytesDeserializer, MapAccessDeserializer, SeqAccessDeserializer};
    use serde::de::{MapAccess, SeqAccess, Visitor};

    pub fn serialize<T: Pod, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        super::serialize(v, s)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: Pod + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Pod + Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "lowercase hex of at most {} bytes, or the struct",
                    size_of::<T>()
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
                decode(s).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
            // kvm-bindings writes some structs as byte strings or sequences.
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<T, E> {
                T::deserialize(BytesDeserializer::new(b))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }

    /// The same for an optional struct.
    pub mod option {
        use super::*;

        struct Either<T>(T);

        impl<'de, T: Pod + Deserialize<'de>> Deserialize<'de> for Either<T> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                super::deserialize(d).map(Either)
            }
        }

        pub fn serialize<T: Pod, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
            super::super::option::serialize(v, s)
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: Pod + Deserialize<'de>,
            D: Deserializer<'de>,
        {
            Ok(Option::<Either<T>>::deserialize(d)?.map(|e| e.0))
        }
    }
}

/// CPUID entries, written since format 1.2 as one hex string of seven
/// little-endian words per entry (function, index, flags, eax, ebx, ecx,
/// edx); read also as the `(function, index, ...)` tuples of formats 1.0
/// and 1.1. As tuples they were a third of a one-vCPU state's decoding.
pub mod cpuid {
    use kvm_bindings::kvm_cpuid_entry2;
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    type Entry = (u32, u32, u32, u32, u32, u32, u32);
    /// Hex characters per entry: seven words of eight.
    const ENTRY_HEX: usize = 56;

    fn words(e: &kvm_cpuid_entry2) -> [u32; 7] {
        [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
    }

    fn entry(w: [u32; 7]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: w[0],
            index: w[1],
            flags: w[2],
            eax: w[3],
            ebx: w[4],
            ecx: w[5],
            edx: w[6],
            ..Default::default()
        }
    }

    pub fn serialize<S: Serializer>(v: &[kvm_cpuid_entry2], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(words)
            .flat_map(u32::to_le_bytes)
            .collect();
        super::hex(&bytes).serialize(s)
    }

    fn parse(s: &str) -> Option<Vec<kvm_cpuid_entry2>> {
        let h = s.as_bytes();
        if !h.len().is_multiple_of(ENTRY_HEX) {
            return None;
        }
        h.chunks_exact(ENTRY_HEX)
            .map(|e| {
                let mut w = [0u32; 7];
                for (word, hex) in w.iter_mut().zip(e.chunks_exact(8)) {
                    let mut b = [0u8; 4];
                    super::unhex(&mut b, hex)?;
                    *word = u32::from_le_bytes(b);
                }
                Some(entry(w))
            })
            .collect()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<kvm_cpuid_entry2>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<kvm_cpuid_entry2>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CPUID entries as hex, or as (function, index, ...) tuples")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                parse(s).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((a, b, c, d, e, f, g)) = seq.next_element::<Entry>()? {
                    v.push(entry([a, b, c, d, e, f, g]));
                }
                Ok(v)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_lapic_state;

    #[test]
    fn round_trip_trims_trailing_zeros_and_refuses_garbage() {
        let mut l = kvm_lapic_state::default();
        l.regs[0] = 1;
        l.regs[5] = -1;
        let s = encode(&l);
        assert_eq!(s, "0100000000ff");
        let back: kvm_lapic_state = decode(&s).unwrap();
        assert_eq!(back.regs[..], l.regs[..]);
        assert_eq!(encode(&kvm_lapic_state::default()), "");
        assert!(decode::<kvm_lapic_state>("0").is_none());
        assert!(decode::<kvm_lapic_state>("zz").is_none());
        assert!(decode::<kvm_lapic_state>("AB").is_none());
        assert!(decode::<kvm_lapic_state>(&"00".repeat(1025)).is_none());
    }
}
