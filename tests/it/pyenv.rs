//! Python virtual environments for tests that run a real Python program against the server
//! (an application service built with mautrix, later Synapse): created once per package set
//! under `$HOME/.cache/plaza-py`, under a lock file so parallel tests and CI share one, from a
//! requirements file under `tests/py/` pinning every package, so every machine runs the same code.

use std::{io::Write, os::fd::AsRawFd, path::PathBuf, process::Command};

/// The root of the shared environments.
pub fn root() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("plaza-py")
}

/// The Python interpreter of the environment `name`, with exactly the packages of
/// `tests/py/{name}.txt` installed. The first caller creates it; the others wait on the lock and
/// reuse it. The environment is rebuilt when the requirements file changes.
pub fn venv(name: &str) -> PathBuf {
    let root = root();
    std::fs::create_dir_all(&root).expect("create the Python cache directory");
    let dir = root.join(name);
    let python = dir.join("bin").join("python");
    let marker = dir.join(".plaza-packages");
    let requirements = dir_of_scripts().join(format!("{name}.txt"));
    let wanted = std::fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements.display()));
    if std::fs::read_to_string(&marker).is_ok_and(|have| have == wanted) {
        return python;
    }
    let lock = std::fs::File::create(root.join(format!("{name}.lock"))).expect("lock file");
    // SAFETY: flock takes the descriptor of a file this function keeps open until it returns.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "could not lock {name}.lock");
    if std::fs::read_to_string(&marker).is_ok_and(|have| have == wanted) {
        return python;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove an outdated environment");
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir), "python3 -m venv");
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install",
    );
    let mut file = std::fs::File::create(&marker).expect("write the marker");
    file.write_all(wanted.as_bytes()).expect("write the marker");
    python
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A script under `tests/py/`.
pub fn script(name: &str) -> PathBuf {
    dir_of_scripts().join(name)
}

/// `tests/py/` of the checkout being tested: read when the tests run, so a build shared between
/// checkouts in different places still finds the files of its own.
fn dir_of_scripts() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests")
        .join("py")
}
