//! KVM's large state structs (XSAVE area, LAPIC page, irqchips, PIT) in
//! the machine state as compact hex strings, trailing zero bytes left out.
//!
//! kvm-bindings serializes them as RON byte strings, where each zero byte
//! is four characters (`\x00`): 45 KB for a one-vCPU machine, and decoding
//! that is most of a migration's downtime. As hex they are a third of it,
//! and a RON string without escapes decodes at memchr speed. Use with
//! `#[serde(with = "crate::kvm_blob")]` (or `kvm_blob::option`).

use serde::de::Error as _;
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

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no uninitialized bytes; the slice borrows `v`
    // for its lifetime and covers exactly its size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn encode<T: Pod>(v: &T) -> String {
    let b = bytes_of(v);
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    let mut s = String::with_capacity(2 * end);
    for x in &b[..end] {
        s.push(char::from(b"0123456789abcdef"[usize::from(x >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(x & 15)]));
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes `s` into a zeroed `T`; `None` when it is not lowercase hex of
/// at most `size_of::<T>()` bytes.
fn decode<T: Pod>(s: &str) -> Option<T> {
    let h = s.as_bytes();
    if !h.len().is_multiple_of(2) || h.len() / 2 > size_of::<T>() {
        return None;
    }
    let mut bytes = vec![0u8; size_of::<T>()];
    for (dst, pair) in bytes.iter_mut().zip(h.chunks_exact(2)) {
        *dst = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    let mut v = T::default();
    // SAFETY: `bytes` has exactly size_of::<T>() bytes and any bit pattern
    // is a valid `T: Pod`; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut v as *mut T).cast::<u8>(),
            size_of::<T>(),
        )
    };
    Some(v)
}

pub fn serialize<T: Pod, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    encode(v).serialize(s)
}

pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    decode(&s).ok_or_else(|| {
        D::Error::custom(format!(
            "expected lowercase hex of at most {} bytes",
            size_of::<T>()
        ))
    })
}

/// The same for an optional struct.
pub mod option {
    use super::*;

    pub fn serialize<T: Pod, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(encode).serialize(s)
    }

    pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => decode(&s).map(Some).ok_or_else(|| {
                D::Error::custom(format!(
                    "expected lowercase hex of at most {} bytes",
                    size_of::<T>()
                ))
            }),
        }
    }
}

/// CPUID entries as `(function, index, flags, eax, ebx, ecx, edx)`
/// tuples: a third of the named-field form.
pub mod cpuid {
    use kvm_bindings::kvm_cpuid_entry2;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Entry = (u32, u32, u32, u32, u32, u32, u32);

    pub fn serialize<S: Serializer>(v: &[kvm_cpuid_entry2], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
            .collect::<Vec<Entry>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<kvm_cpuid_entry2>, D::Error> {
        Ok(Vec::<Entry>::deserialize(d)?
            .into_iter()
            .map(
                |(function, index, flags, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
                    function,
                    index,
                    flags,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                },
            )
            .collect())
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
