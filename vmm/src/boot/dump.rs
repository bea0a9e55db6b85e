//! `--dump-acpi DIR`: the ACPI tables a VM started with the same flags
//! would get, each written raw to `DIR/<SIGNATURE>.dat` (XSDT.dat,
//! FACP.dat, APIC.dat, DSDT.dat), for `iasl -d` and friends. The RSDP is
//! left out: it has no table header, and `iasl -d` refuses it raw.
//! Runs no guest, opens neither /dev/kvm nor netd: the `--net` devices are
//! described from the command line alone, in the slots a boot gives them.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::firmware::{ACPI_ADDR, FirmwareError, MPTABLE_ADDR, Platform};
use crate::config::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("--dump-acpi {path}: {err}")]
    Dir { path: PathBuf, err: std::io::Error },
    #[error("--dump-acpi {0}: not a directory")]
    NotADir(PathBuf),
    #[error("{0}")]
    Firmware(#[from] FirmwareError),
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
}

/// Builds the tables for `cfg` (its vCPU count and `--net` devices) and
/// writes them into `dir`, which must be an existing directory. Returns
/// the files written.
pub fn dump_acpi(cfg: &VmConfig, dir: &Path) -> Result<Vec<PathBuf>, DumpError> {
    let meta = std::fs::metadata(dir).map_err(|err| DumpError::Dir {
        path: dir.to_path_buf(),
        err,
    })?;
    if !meta.is_dir() {
        return Err(DumpError::NotADir(dir.to_path_buf()));
    }
    let platform = Platform::with_devices(u32::from(cfg.vcpus), cfg.nets.len())?;
    let tables = super::acpi::build(&platform, ACPI_ADDR, MPTABLE_ADDR)?;
    let mut written = Vec::new();
    for t in tables.sdts() {
        let path = dir.join(format!("{}.dat", t.signature()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&t.bytes)?;
            f.sync_all()
        };
        write().map_err(|err| DumpError::Write {
            path: path.clone(),
            err,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> VmConfig {
        VmConfig::parse(args.iter().map(|s| s.to_string()))
            .unwrap()
            .run()
            .unwrap()
    }

    #[test]
    fn writes_each_table_under_its_signature() {
        let dir = std::env::temp_dir().join(format!("dump-acpi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        let c = cfg(&["--kernel", "k", "--net", "netd=/nonexistent,id=vm0"]);
        let files = dump_acpi(&c, &dir).unwrap();
        let mut names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["APIC.dat", "DSDT.dat", "FACP.dat", "XSDT.dat"]);
        let dsdt = std::fs::read(dir.join("DSDT.dat")).unwrap();
        assert!(dsdt.windows(4).any(|w| w == b"V000"));
        assert!(!dsdt.windows(4).any(|w| w == b"V001"));

        let file = dir.join("APIC.dat");
        assert!(matches!(dump_acpi(&c, &file), Err(DumpError::NotADir(_))));
        assert!(matches!(
            dump_acpi(&c, &dir.join("missing")),
            Err(DumpError::Dir { .. })
        ));
    }
}
