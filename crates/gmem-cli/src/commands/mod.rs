//! One module per subcommand.

pub mod bench;
pub mod probe;
pub mod run;
pub mod selftest;
