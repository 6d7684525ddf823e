//! 160-bit identifiers on the Chord ring and the interval arithmetic that wraps around it.
//!
//! Owns: the `Id` type, its arithmetic modulo 2^160 and the half-open ring intervals
//! Chord is defined with. Never does I/O.

use sha1::{Digest, Sha1};
use std::fmt;

/// A point on the ring, 0 ..= 2^160 - 1. Derived `Ord` compares `hi`, then `mid`, then
/// `lo`, which is the numeric order of the big-endian 160-bit value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Id {
    hi: u64,
    mid: u64,
    lo: u32,
}

pub const ID_BYTES: usize = 20;

impl Id {
    pub const ZERO: Id = Id { hi: 0, mid: 0, lo: 0 };
    pub const MAX: Id = Id { hi: u64::MAX, mid: u64::MAX, lo: u32::MAX };

    pub fn from_bytes(b: &[u8; ID_BYTES]) -> Id {
        Id {
            hi: u64::from_be_bytes(b[0..8].try_into().expect("8-byte slice")),
            mid: u64::from_be_bytes(b[8..16].try_into().expect("8-byte slice")),
            lo: u32::from_be_bytes(b[16..20].try_into().expect("4-byte slice")),
        }
    }

    /// Parses exactly 20 bytes; anything else is `None` (callers turn it into a clear error).
    pub fn from_slice(b: &[u8]) -> Option<Id> {
        let arr: &[u8; ID_BYTES] = b.try_into().ok()?;
        Some(Id::from_bytes(arr))
    }

    pub fn to_bytes(self) -> [u8; ID_BYTES] {
        let mut out = [0u8; ID_BYTES];
        out[0..8].copy_from_slice(&self.hi.to_be_bytes());
        out[8..16].copy_from_slice(&self.mid.to_be_bytes());
        out[16..20].copy_from_slice(&self.lo.to_be_bytes());
        out
    }

    pub fn sha1(data: &[u8]) -> Id {
        let digest = Sha1::digest(data);
        Id::from_bytes(digest.as_slice().try_into().expect("sha1 is 20 bytes"))
    }

    /// 2^exp for exp in 0..160.
    pub fn pow2(exp: u32) -> Id {
        assert!(exp < 160, "pow2 exponent {exp} out of the 160-bit ring");
        match exp {
            0..=31 => Id { hi: 0, mid: 0, lo: 1 << exp },
            32..=95 => Id { hi: 0, mid: 1 << (exp - 32), lo: 0 },
            _ => Id { hi: 1 << (exp - 96), mid: 0, lo: 0 },
        }
    }

    pub fn wrapping_add(self, o: Id) -> Id {
        let (lo, c0) = self.lo.overflowing_add(o.lo);
        let (mid, c1a) = self.mid.overflowing_add(o.mid);
        let (mid, c1b) = mid.overflowing_add(c0 as u64);
        let hi = self.hi.wrapping_add(o.hi).wrapping_add((c1a || c1b) as u64);
        Id { hi, mid, lo }
    }

    pub fn wrapping_sub(self, o: Id) -> Id {
        let (lo, b0) = self.lo.overflowing_sub(o.lo);
        let (mid, b1a) = self.mid.overflowing_sub(o.mid);
        let (mid, b1b) = mid.overflowing_sub(b0 as u64);
        let hi = self.hi.wrapping_sub(o.hi).wrapping_sub((b1a || b1b) as u64);
        Id { hi, mid, lo }
    }

    /// Clockwise distance from `self` to `to` (0 when equal).
    pub fn distance_to(self, to: Id) -> Id {
        to.wrapping_sub(self)
    }

    /// Whether `self` lies in the ring interval (a, b]. When a == b the interval is the
    /// whole ring: a single vnode owns every key.
    pub fn in_open_closed(self, a: Id, b: Id) -> bool {
        if a == b {
            return true;
        }
        a.distance_to(self) != Id::ZERO && a.distance_to(self) <= a.distance_to(b)
    }

    /// Whether `self` lies in the ring interval (a, b). When a == b: every point but a.
    pub fn in_open_open(self, a: Id, b: Id) -> bool {
        if a == b {
            return self != a;
        }
        let d = a.distance_to(self);
        d != Id::ZERO && d < a.distance_to(b)
    }

    /// The value as a fraction of the whole ring, for shares and statistics (f64 precision).
    pub fn as_fraction(self) -> f64 {
        const TWO64: f64 = 18446744073709551616.0;
        (self.hi as f64 + self.mid as f64 / TWO64 + self.lo as f64 / TWO64 / 4294967296.0) / TWO64
    }

    /// The point at `fraction` (0..1) of the ring; used to choose vnode positions.
    pub fn from_fraction(fraction: f64) -> Id {
        const TWO64: f64 = 18446744073709551616.0;
        let f = fraction.clamp(0.0, 1.0 - f64::EPSILON);
        let hi_f = f * TWO64;
        let hi = hi_f as u64;
        let mid = ((hi_f - hi as f64) * TWO64) as u64;
        Id { hi, mid, lo: 0 }
    }

    /// Multiply a distance by a factor in [0, 1]; exact enough for choosing split points.
    pub fn scale(self, factor: f64) -> Id {
        Id::from_fraction(self.as_fraction() * factor.clamp(0.0, 1.0))
    }

    /// floor(log2(self)), None for zero.
    pub fn log2(self) -> Option<u32> {
        if self.hi != 0 {
            Some(96 + 63 - self.hi.leading_zeros())
        } else if self.mid != 0 {
            Some(32 + 63 - self.mid.leading_zeros())
        } else if self.lo != 0 {
            Some(31 - self.lo.leading_zeros())
        } else {
            None
        }
    }

    pub fn to_hex(self) -> String {
        self.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Id> {
        if s.len() != 2 * ID_BYTES || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; ID_BYTES];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let txt = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(txt, 16).ok()?;
        }
        Some(Id::from_bytes(&out))
    }

    pub fn short(self) -> String {
        self.to_hex()[..8].to_string()
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id_strategy() -> impl Strategy<Value = Id> {
        prop::array::uniform20(any::<u8>()).prop_map(|b| Id::from_bytes(&b))
    }

    fn to_u256(id: Id) -> (u128, u128) {
        // high 32 bits in .0, low 128 bits in .1: a 160-bit number exactly
        let b = id.to_bytes();
        let hi = u32::from_be_bytes(b[0..4].try_into().unwrap()) as u128;
        let lo = u128::from_be_bytes(b[4..20].try_into().unwrap());
        (hi, lo)
    }

    #[test]
    fn pow2_and_log2_agree() {
        for e in 0..160 {
            assert_eq!(Id::pow2(e).log2(), Some(e));
        }
        assert_eq!(Id::ZERO.log2(), None);
    }

    #[test]
    fn wrap_at_the_top() {
        assert_eq!(Id::MAX.wrapping_add(Id::pow2(0)), Id::ZERO);
        assert_eq!(Id::ZERO.wrapping_sub(Id::pow2(0)), Id::MAX);
        assert_eq!(Id::pow2(159).wrapping_add(Id::pow2(159)), Id::ZERO);
    }

    #[test]
    fn intervals_that_wrap() {
        let a = Id::MAX.wrapping_sub(Id::pow2(10));
        let b = Id::pow2(10);
        assert!(Id::ZERO.in_open_closed(a, b));
        assert!(Id::MAX.in_open_closed(a, b));
        assert!(b.in_open_closed(a, b));
        assert!(!a.in_open_closed(a, b));
        assert!(!Id::pow2(20).in_open_closed(a, b));
        assert!(!b.in_open_open(a, b));
        // a == b means the whole ring for (a, b] and all but a for (a, b)
        assert!(Id::pow2(50).in_open_closed(a, a));
        assert!(a.in_open_closed(a, a));
        assert!(!a.in_open_open(a, a));
    }

    proptest! {
        #[test]
        fn add_sub_roundtrip(a in id_strategy(), b in id_strategy()) {
            prop_assert_eq!(a.wrapping_add(b).wrapping_sub(b), a);
            prop_assert_eq!(a.distance_to(b).wrapping_add(a), b);
        }

        #[test]
        fn bytes_and_hex_roundtrip(a in id_strategy()) {
            prop_assert_eq!(Id::from_bytes(&a.to_bytes()), a);
            prop_assert_eq!(Id::from_hex(&a.to_hex()), Some(a));
        }

        #[test]
        fn order_is_numeric(a in id_strategy(), b in id_strategy()) {
            prop_assert_eq!(a.cmp(&b), to_u256(a).cmp(&to_u256(b)));
        }

        #[test]
        fn addition_matches_wide_arithmetic(a in id_strategy(), b in id_strategy()) {
            let (ah, al) = to_u256(a);
            let (bh, bl) = to_u256(b);
            let (lo, carry) = al.overflowing_add(bl);
            let hi = (ah + bh + carry as u128) & 0xffff_ffff;
            prop_assert_eq!(to_u256(a.wrapping_add(b)), (hi, lo));
        }

        #[test]
        fn exactly_one_side_owns_a_point(x in id_strategy(), a in id_strategy(), b in id_strategy()) {
            prop_assume!(a != b);
            // (a, b] and (b, a] partition the ring
            prop_assert!(x.in_open_closed(a, b) != x.in_open_closed(b, a));
            // (a, b) is (a, b] without b
            prop_assert_eq!(x.in_open_open(a, b), x.in_open_closed(a, b) && x != b);
        }

        #[test]
        fn fraction_roundtrip_is_close(a in id_strategy()) {
            let back = Id::from_fraction(a.as_fraction());
            let err = if back > a { back.wrapping_sub(a) } else { a.wrapping_sub(back) };
            prop_assert!(err.as_fraction() < 1e-12);
        }
    }
}
