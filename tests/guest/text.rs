//! Number formatting and parsing without core::fmt (whose precompiled code
//! may use SSE, which this host's guests cannot execute).

/// A fixed-capacity byte buffer; text that does not fit is cut off.
pub struct TextBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> TextBuf<N> {
    pub const fn new() -> Self {
        TextBuf {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    pub fn byte(&mut self, b: u8) -> &mut Self {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }

    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            if let Some(d) = digits.get_mut(n) {
                *d = b'0' + (v % 10) as u8;
            }
            n += 1;
            v /= 10;
            if v == 0 || n >= digits.len() {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            let d = digits.get(n).copied().unwrap_or(b'?');
            self.byte(d);
        }
        self
    }

    /// Exactly `digits` lowercase hex digits of the low bits of `v`.
    pub fn hex(&mut self, v: u64, digits: u32) -> &mut Self {
        let mut i = digits.min(16);
        while i > 0 {
            i -= 1;
            let nib = ((v >> (i * 4)) & 0xf) as u8;
            self.byte(if nib < 10 {
                b'0' + nib
            } else {
                b'a' + nib - 10
            });
        }
        self
    }

    pub fn ipv4(&mut self, ip: [u8; 4]) -> &mut Self {
        for (i, o) in ip.iter().enumerate() {
            if i > 0 {
                self.byte(b'.');
            }
            self.dec(u64::from(*o));
        }
        self
    }
}

/// Parses an unsigned decimal, or hex with a 0x prefix. None on anything else
/// or on overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16u64),
        _ => (s, 10u64),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Linux `memparse` style: a number with an optional K/M/G suffix.
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.split_last() {
        Some((b'k' | b'K', rest)) => (rest, 10),
        Some((b'm' | b'M', rest)) => (rest, 20),
        Some((b'g' | b'G', rest)) => (rest, 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1u64 << shift)
}

/// `A.B.C.D`.
pub fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 {
            return None;
        }
        *o = u8::try_from(parse_u64(p)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}
