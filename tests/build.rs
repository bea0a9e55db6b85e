//! Exposes the target directory to the tests. The test guest build is added here.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out; the
    // target directory is the ancestor holding CACHEDIR.TAG.
    let target = out
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .expect("OUT_DIR lies inside a cargo target directory")
        .to_path_buf();
    println!("cargo:rustc-env=TESTS_TARGET_DIR={}", target.display());
}
