//! A reader for the one shape of RON this project writes, tried before
//! `ron` by [`super::decode`]: no whitespace or comments, no struct names,
//! no extensions, integers in decimal, strings without escapes, byte
//! strings with `ron`'s escapes. That is all the migration's machine state
//! is, and `ron` spends three quarters of its decoding in generic work the
//! state does not need (scanning for whitespace and comments before every
//! token, checking identifiers char by char): inside a migration's pause.
//!
//! It refuses whatever it is not certain to read exactly as `ron` does
//! (anything outside that shape, and every error); `decode` then hands the
//! text to `ron`, which reads it or gives its own error. So it can only
//! make a decode faster, never different: it accepts a subset of what
//! `ron` accepts, and each value it accepts means to it what it means to
//! `ron` (the tests hold both to that on the documents the project writes
//! and on mutations of them).

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};

/// Deeper than any message of the project nests, and below `ron`'s own
/// limit (128), so a document `ron` refuses as too deep is refused here
/// first, and a hostile one cannot exhaust the stack.
const MAX_DEPTH: u32 = 64;

/// Parses `text` as a `T`, or `None` when it is not in the compact shape
/// or not a `T` (then `ron` decides).
pub(super) fn from_str<T: DeserializeOwned>(text: &str) -> Option<T> {
    let mut r = Reader {
        text,
        pos: 0,
        depth: 0,
    };
    let v = T::deserialize(&mut r).ok()?;
    (r.pos == text.len()).then_some(v)
}

/// The one error: "not for this reader". Its reason is not kept, since
/// `ron` reads the text again and gives its own.
#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not compact RON")
    }
}

impl std::error::Error for Refused {}

impl de::Error for Refused {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Refused
    }
}

type Result<T> = std::result::Result<T, Refused>;

struct Reader<'de> {
    text: &'de str,
    pos: usize,
    depth: u32,
}

impl<'de> Reader<'de> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &'de [u8] {
        self.text.as_bytes().get(self.pos..).unwrap_or_default()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.pos += usize::from(hit);
        hit
    }

    fn expect(&mut self, b: u8) -> Result<()> {
        if self.eat(b) { Ok(()) } else { Err(Refused) }
    }

    fn eat_word(&mut self, w: &str) -> bool {
        let rest = self.rest();
        let hit =
            rest.starts_with(w.as_bytes()) && !rest.get(w.len()).is_some_and(|&c| is_ident_char(c));
        if hit {
            self.pos += w.len();
        }
        hit
    }

    /// Runs `f` one level deeper, refusing past [`MAX_DEPTH`].
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.depth >= MAX_DEPTH {
            return Err(Refused);
        }
        self.depth += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    /// `open`, what `f` reads, then `close`.
    fn group<T>(
        &mut self,
        open: u8,
        close: u8,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.expect(open)?;
        let v = self.nested(f)?;
        self.expect(close)?;
        Ok(v)
    }

    /// An ASCII identifier (`ron` also takes raw and Unicode ones: those
    /// are refused here).
    fn ident(&mut self) -> Result<&'de str> {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        match bytes.get(start) {
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {}
            _ => return Err(Refused),
        }
        let len = bytes[start..]
            .iter()
            .position(|&c| !is_ident_char(c))
            .unwrap_or(bytes.len() - start);
        self.pos += len;
        self.text.get(start..self.pos).ok_or(Refused)
    }

    /// Decimal digits as `ron` writes them: no sign, no leading zero, no
    /// `_`, no suffix.
    fn unsigned(&mut self) -> Result<u64> {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let mut v: u64 = 0;
        while let Some(&c) = bytes.get(self.pos) {
            if !c.is_ascii_digit() {
                break;
            }
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or(Refused)?;
            self.pos += 1;
        }
        let digits = self.pos - start;
        if digits == 0 || (digits > 1 && bytes[start] == b'0') {
            return Err(Refused);
        }
        Ok(v)
    }

    fn signed(&mut self) -> Result<i64> {
        if !self.eat(b'-') {
            return i64::try_from(self.unsigned()?).map_err(|_| Refused);
        }
        match self.unsigned()? {
            0 => Err(Refused),
            m => 0i64.checked_sub_unsigned(m).ok_or(Refused),
        }
    }

    /// A string without escapes, lent from the text (`ron` lends it too).
    fn string(&mut self) -> Result<&'de str> {
        self.expect(b'"')?;
        let rest = self.text.get(self.pos..).ok_or(Refused)?;
        let end = rest.find('"').ok_or(Refused)?;
        let s = &rest[..end];
        if s.as_bytes().contains(&b'\\') {
            return Err(Refused);
        }
        self.pos += end + 1;
        Ok(s)
    }

    /// A byte string (`b"..."`) with the escapes `ron` writes in one.
    fn byte_string(&mut self) -> Result<Cow<'de, [u8]>> {
        if !self.rest().starts_with(b"b\"") {
            return Err(Refused);
        }
        self.pos += 2;
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let end = start
            + bytes[start..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\')
                .ok_or(Refused)?;
        if bytes[end] == b'"' {
            self.pos = end + 1;
            return Ok(Cow::Borrowed(&bytes[start..end]));
        }
        let mut out = bytes[start..end].to_vec();
        self.pos = end;
        loop {
            match self.peek().ok_or(Refused)? {
                b'"' => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                b'\\' => {
                    let (b, len) = escape(&self.rest()[1..]).ok_or(Refused)?;
                    out.push(b);
                    self.pos += 1 + len;
                }
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// After an element: `,` then another, or `close`. A trailing comma
    /// (which `ron` takes) is refused.
    fn more(&mut self, first: &mut bool, close: u8) -> Result<bool> {
        if self.peek() == Some(close) {
            return Ok(false);
        }
        if !std::mem::take(first) {
            self.expect(b',')?;
            if self.peek() == Some(close) {
                return Err(Refused);
            }
        }
        Ok(true)
    }
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// One escape after a backslash in a byte string: its byte and how many
/// characters it took. `None` for any `ron` writes not (`\u{..}`, a line
/// continuation).
fn escape(s: &[u8]) -> Option<(u8, usize)> {
    let b = match *s.first()? {
        b'\'' => b'\'',
        b'"' => b'"',
        b'\\' => b'\\',
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'0' => b'\0',
        b'x' => {
            let hex = std::str::from_utf8(s.get(1..3)?).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            return Some((u8::from_str_radix(hex, 16).ok()?, 3));
        }
        _ => return None,
    };
    Some((b, 1))
}

macro_rules! unsigned {
    ($($method:ident => $visit:ident: $t:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
            v.$visit(<$t>::try_from(self.unsigned()?).map_err(|_| Refused)?)
        }
    )*};
}

macro_rules! signed {
    ($($method:ident => $visit:ident: $t:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
            v.$visit(<$t>::try_from(self.signed()?).map_err(|_| Refused)?)
        }
    )*};
}

macro_rules! refused {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
            Err(Refused)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Reader<'de> {
    type Error = Refused;

    /// Only what the project reads through `deserialize_any` (a hex
    /// string, or a byte string) in the compact shape; anything else goes
    /// to `ron`.
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        match self.peek() {
            Some(b'"') => v.visit_borrowed_str(self.string()?),
            Some(b'b') => self.deserialize_bytes(v),
            _ => Err(Refused),
        }
    }

    unsigned!(deserialize_u8 => visit_u8: u8, deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32, deserialize_u64 => visit_u64: u64);
    signed!(deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32, deserialize_i64 => visit_i64: i64);
    refused!(
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_ignored_any
    );

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        if self.eat_word("true") {
            v.visit_bool(true)
        } else if self.eat_word("false") {
            v.visit_bool(false)
        } else {
            Err(Refused)
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        v.visit_borrowed_str(self.string()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.deserialize_str(v)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        match self.byte_string()? {
            Cow::Borrowed(b) => v.visit_borrowed_bytes(b),
            Cow::Owned(b) => v.visit_byte_buf(b),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.deserialize_bytes(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        if self.eat_word("None") {
            v.visit_none()
        } else if self.eat_word("Some") {
            self.group(b'(', b')', |r| v.visit_some(r))
        } else {
            Err(Refused)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.expect(b'(')?;
        self.expect(b')')?;
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value> {
        // `ron`'s raw values (`ron::value::RawValue`) are read its own way.
        if name.starts_with('$') {
            return Err(Refused);
        }
        self.group(b'(', b')', |r| v.visit_newtype_struct(r))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.group(b'[', b']', |r| v.visit_seq(Items::new(r, b']')))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value> {
        self.group(b'(', b')', |r| v.visit_seq(Items::new(r, b')')))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(len, v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        self.group(b'{', b'}', |r| v.visit_map(Items::new(r, b'}')))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value> {
        self.group(b'(', b')', |r| v.visit_map(Items::new(r, b')')))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value> {
        self.nested(|r| v.visit_enum(r))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value> {
        v.visit_borrowed_str(self.ident()?)
    }
}

/// The elements of a sequence or tuple, or the `key:value` entries of a
/// map or struct, up to `close`.
struct Items<'a, 'de> {
    r: &'a mut Reader<'de>,
    close: u8,
    first: bool,
}

impl<'a, 'de> Items<'a, 'de> {
    fn new(r: &'a mut Reader<'de>, close: u8) -> Self {
        Items {
            r,
            close,
            first: true,
        }
    }

    /// The next element (or key), or `None` at `close`.
    fn next<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if !self.r.more(&mut self.first, self.close)? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.r).map(Some)
    }
}

impl<'de> SeqAccess<'de> for Items<'_, 'de> {
    type Error = Refused;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        self.next(seed)
    }
}

impl<'de> MapAccess<'de> for Items<'_, 'de> {
    type Error = Refused;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        self.next(seed)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        self.r.expect(b':')?;
        seed.deserialize(&mut *self.r)
    }
}

impl<'de> EnumAccess<'de> for &mut Reader<'de> {
    type Error = Refused;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let name = self.ident()?;
        let v = seed.deserialize(de::value::BorrowedStrDeserializer::new(name))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for &mut Reader<'de> {
    type Error = Refused;

    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        self.group(b'(', b')', |r| seed.deserialize(r))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value> {
        de::Deserializer::deserialize_tuple(self, len, v)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value> {
        de::Deserializer::deserialize_struct(self, "", fields, v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Unit,
        Newtype(u16),
        Tuple(i8, bool),
        Struct { a: Option<u8>, b: String },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Wrapper(Vec<u8>);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: String,
        #[serde(with = "serde_bytes_like")]
        blob: Vec<u8>,
        small: u8,
        big: u64,
        neg: i64,
        flag: bool,
        maybe: Option<Option<u32>>,
        kinds: Vec<Kind>,
        pair: (u32, i32),
        wrapped: Wrapper,
        map: BTreeMap<String, u16>,
        unit: (),
        #[serde(default)]
        added: u32,
    }

    /// A `Vec<u8>` as a RON byte string, as kvm-bindings writes its structs.
    mod serde_bytes_like {
        use serde::de::{Deserializer, Visitor};
        use serde::ser::Serializer;

        pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, b: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(b.to_vec())
                }
            }
            d.deserialize_bytes(V)
        }
    }

    fn doc() -> Doc {
        Doc {
            name: "vm0".into(),
            blob: vec![
                0, 1, b'"', b'\\', b'\'', b'\n', b'\r', b'\t', 0x7f, 0xff, b'G',
            ],
            small: 255,
            big: u64::MAX,
            neg: i64::MIN,
            flag: true,
            maybe: Some(None),
            kinds: vec![
                Kind::Unit,
                Kind::Newtype(7),
                Kind::Tuple(-3, false),
                Kind::Struct {
                    a: Some(0),
                    b: "00ff".repeat(8),
                },
            ],
            pair: (0, -1),
            wrapped: Wrapper(vec![1, 2, 3]),
            map: [("a".to_string(), 1), ("b".to_string(), 2)].into(),
            unit: (),
            added: 9,
        }
    }

    /// What `ron` makes of `text`, or `None`.
    fn by_ron<T: DeserializeOwned>(text: &str) -> Option<T> {
        ron::from_str(text).ok()
    }

    #[test]
    fn reads_what_the_codec_writes_as_ron_does() {
        let d = doc();
        for text in [
            super::super::encode(&d).unwrap(),
            super::super::encode_unescaped(&d).unwrap(),
        ] {
            assert_eq!(from_str::<Doc>(&text), Some(doc()), "{text}");
            assert_eq!(by_ron::<Doc>(&text), Some(doc()), "{text}");
        }
    }

    #[test]
    fn leaves_to_ron_what_it_does_not_read_as_ron_does() {
        let text = super::super::encode(&doc()).unwrap();
        let refused = [
            // Whitespace, comments, struct names, extensions.
            format!(" {text}"),
            format!("{text}\n"),
            text.replacen("name:", "name: ", 1),
            text.replacen("(name", "Doc(name", 1),
            format!("/*c*/{text}"),
            format!("#![enable(implicit_some)]{text}"),
            // Numbers in any form but plain decimal.
            text.replacen("small:255", "small:0xff", 1),
            text.replacen("small:255", "small:2_55", 1),
            text.replacen("small:255", "small:+255", 1),
            text.replacen("small:255", "small:0255", 1),
            text.replacen("small:255", "small:255u8", 1),
            text.replacen("pair:(0,", "pair:(-0,", 1),
            // Out of range, wrong type.
            text.replacen("small:255", "small:256", 1),
            text.replacen("small:255", "small:-1", 1),
            text.replacen("big:18446744073709551615", "big:18446744073709551616", 1),
            text.replacen("flag:true", "flag:1", 1),
            // Escapes and raw strings.
            text.replacen("name:\"vm0\"", "name:\"v\\u{6d}0\"", 1),
            text.replacen("name:\"vm0\"", "name:r\"vm0\"", 1),
            text.replacen("name:\"vm0\"", "name:\"vm0\\\n\"", 1),
            // Trailing commas, unknown fields, missing parts, leftovers.
            text.replacen(",unit:()", ",unit:(),", 1),
            text.replacen("(name", "(extra:1,name", 1),
            text.replacen("name:\"vm0\",", "", 1),
            format!("{text})"),
            text[..text.len() - 1].to_string(),
            String::new(),
        ];
        for t in &refused {
            assert!(from_str::<Doc>(t).is_none(), "read {t:?}");
        }
        // The field added with a default may be absent, as for `ron`.
        let old = text.replacen(",added:9", "", 1);
        assert_eq!(from_str::<Doc>(&old).map(|d| d.added), Some(0));
    }

    #[test]
    fn refuses_nesting_deeper_than_its_limit_without_recursing_on() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Deep(Vec<Deep>);
        let depth = |n: usize| format!("{}{}", "([".repeat(n), "])".repeat(n));
        assert!(from_str::<Deep>(&depth(10)).is_some());
        assert!(from_str::<Deep>(&depth(MAX_DEPTH as usize)).is_none());
        // A hostile depth costs a refusal, not the stack.
        assert!(from_str::<Deep>(&depth(100_000)).is_none());
    }

    /// Random damage to a document the codec wrote: whatever the compact
    /// reader still accepts, `ron` accepts too, as the same value.
    #[test]
    fn never_reads_a_damaged_document_otherwise_than_ron() {
        let text = super::super::encode(&doc()).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const BYTES: &[u8] = b"\"\\()[]{},:-0123456789abxSomeNonetruefalse_ \n#/r'";
        let (mut accepted, mut tried) = (0, 0);
        for _ in 0..20_000 {
            let mut t = text.clone().into_bytes();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % t.len();
                match next() % 4 {
                    0 => t[at] = BYTES[(next() as usize) % BYTES.len()],
                    1 => {
                        t.remove(at);
                    }
                    2 => t.insert(at, BYTES[(next() as usize) % BYTES.len()]),
                    _ => t.truncate(at),
                }
                if t.is_empty() {
                    break;
                }
            }
            let Ok(t) = String::from_utf8(t) else {
                continue;
            };
            tried += 1;
            if let Some(v) = from_str::<Doc>(&t) {
                accepted += 1;
                assert_eq!(by_ron::<Doc>(&t), Some(v), "{t}");
            }
        }
        // The damage must leave some documents readable, or this tests
        // nothing but refusals.
        assert!(accepted > 100, "{accepted} of {tried} accepted");
    }
}
