//! Man pages and shell completions from the clap definitions, written by
//! the build scripts of vmm and netd into `target/<profile>/assets/`:
//! `man/<bin>.1`, `completions/bash/<bin>.bash`, `completions/zsh/_<bin>`,
//! `completions/fish/<bin>.fish` (`dist/install.sh` installs them from
//! there).

use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::{Generator, Shell};

/// `target/<profile>/assets` from a build script's `OUT_DIR`
/// (`target/<profile>/build/<pkg>-<hash>/out`), next to the binaries.
pub fn dir_from_out_dir(out_dir: &Path) -> io::Result<PathBuf> {
    let build = out_dir.ancestors().nth(2);
    match (build, out_dir.ancestors().nth(3)) {
        (Some(b), Some(profile)) if b.file_name().is_some_and(|n| n == "build") => {
            Ok(profile.join("assets"))
        }
        _ => Err(io::Error::other(format!(
            "OUT_DIR {} is not <profile>/build/<pkg>/out",
            out_dir.display()
        ))),
    }
}

/// The completion shells and their directory names under `completions/`.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// `cmd`'s man page and completions: (path under `assets/`, contents).
pub fn files(mut cmd: Command) -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let name = cmd.get_name().to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let mut files = vec![(Path::new("man").join(format!("{name}.1")), page)];
    for (shell, dir) in SHELLS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.as_str(), &mut script);
        files.push((
            Path::new("completions")
                .join(dir)
                .join(shell.file_name(&name)),
            script,
        ));
    }
    Ok(files)
}

/// Writes `cmd`'s man page and completions under `assets`.
pub fn write(cmd: Command, assets: &Path) -> io::Result<()> {
    for (rel, bytes) in files(cmd)? {
        let path = assets.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_if_changed(&path, &bytes)?;
    }
    Ok(())
}

/// Leaves an identical file alone (its mtime too), so installs and
/// `make`-style checks see no change on a rebuild.
fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    // Whole or not at all: a reader never sees half a page.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
