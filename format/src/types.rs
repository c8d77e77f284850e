//! Newtypes that keep offsets and epochs apart from counts, positions and sizes.

use std::fmt;

/// A position in a log's record sequence. Record `n` lives at offset `n`; an offset used as a
/// horizon (end, flush, commit) names the first record *not* covered.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

/// A leader term. Every batch carries the epoch it was appended in; epochs never decrease along
/// a log.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Offset {
    /// The offset `count` records further on.
    pub fn plus(self, count: u64) -> Offset {
        Offset(self.0.checked_add(count).expect("offset overflow"))
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
