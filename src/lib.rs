//! The root package holds the examples and the multi-rank integration tests; its library is
//! only the README's code, run as a doctest so that it cannot drift from the API.

/// The README's code runs as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
