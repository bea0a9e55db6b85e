//! Writes netd's man page and shell completions from its clap definition
//! (the `cli` crate) to `target/<profile>/assets/`.

use std::path::PathBuf;

use clap::CommandFactory;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let assets = cli::assets::dir_from_out_dir(&out_dir).unwrap_or_else(|e| panic!("{e}"));
    cli::assets::write(cli::netd::Args::command(), &assets)
        .unwrap_or_else(|e| panic!("man page and completions in {}: {e}", assets.display()));
}
