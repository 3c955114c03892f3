//! A small tmpfs of a test's own, to run out of disk space for real: filled by the test,
//! grown again to give the space back, unmounted on drop. Mounting needs root (this machine and
//! CI run as root); elsewhere the test is skipped, and under `CI=true` that is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs, unmounted (lazily, so open files cannot keep it) on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `20m`) owned by `owner` (a user name, for a
    /// database server writing there), or `None` (skip) where mounting is refused outside CI.
    pub fn mount(size: &str, owner: Option<&str>) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("dir");
        let mounted = run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path()));
        if let Err(e) = mounted {
            assert!(
                !super::in_ci(),
                "cannot mount a tmpfs and CI=true: failing, not skipping: {e}"
            );
            eprintln!("SKIP: cannot mount a tmpfs (root needed): {e}");
            return None;
        }
        let fs = Tmpfs { dir };
        if let Some(user) = owner {
            run(Command::new("chown").arg(format!("{user}:")).arg(fs.path())).expect("chown");
        }
        Some(fs)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }

    /// Writes a filler file so that only about `leave` bytes stay free; returns its path.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let len = self.available().saturating_sub(leave);
        let file = std::fs::File::create(&path).expect("filler");
        // tmpfs allocates pages when they are written (or fallocate'd), not on set_len.
        run(Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&path))
        .expect("fallocate");
        drop(file);
        path
    }

    /// Changes the size (`20m`, `300m`): growing it gives space back to whoever waits for it.
    pub fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path()))
        .expect("remount");
    }
}

impl Tmpfs {
    /// Remounts it read-only (nothing may have a file open for writing on it).
    pub fn read_only(&self) {
        run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path()))
        .expect("remount read-only");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(self.path()));
    }
}
