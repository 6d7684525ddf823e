//! Which peers hold a stripe: the first k+m distinct peers met walking the ring clockwise
//! from the stripe key (its preference list, as in Dynamo). Vnodes follow capacity, so a
//! peer appears first in the walk in proportion to its capacity and the walk spreads load
//! the same way the keyspace does.
//!
//! The holders are a *set*: shard indexes are not tied to positions in the list. When a
//! peer joins inside a stripe's walk, exactly one peer falls off its end and only that
//! peer's shard moves (to the newcomer), which is the least movement possible.

use crate::ring::Contact;

/// The first `n` distinct peers of a clockwise walk (owner first, then its successors).
pub fn distinct_peers<'a, A: Clone + PartialEq + 'a>(walk: impl IntoIterator<Item = &'a Contact<A>>, n: usize) -> Vec<A> {
    let mut out: Vec<A> = Vec::with_capacity(n);
    for c in walk {
        if out.len() == n {
            break;
        }
        if !out.contains(&c.addr) {
            out.push(c.addr.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Id;

    #[test]
    fn skips_repeated_peers_and_stops_at_n() {
        let c = |i: u8, a: &'static str| Contact { id: Id::sha1(&[i]), addr: a };
        let walk = [c(0, "a"), c(1, "a"), c(2, "b"), c(3, "b"), c(4, "c"), c(5, "d")];
        assert_eq!(distinct_peers(&walk, 3), vec!["a", "b", "c"]);
        assert_eq!(distinct_peers(&walk, 9), vec!["a", "b", "c", "d"]);
    }
}
