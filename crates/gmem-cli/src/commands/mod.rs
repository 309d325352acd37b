//! One module per subcommand.

pub mod bench;
pub mod migrate;
pub mod probe;
pub mod restore;
pub mod run;
pub mod selftest;
pub mod snapshot;
