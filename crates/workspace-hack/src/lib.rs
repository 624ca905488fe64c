//! No code: this crate only turns on dependency features for every workspace member that
//! depends on it, so all of the README's commands share one build (see its `Cargo.toml`).
