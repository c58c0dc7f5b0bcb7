//! Child processes for tests and benches: the `wagate` binary built by a
//! builder, and a guard that kills any child when the test ends (also on a
//! panic). Self-contained, so benches include it with `#[path]`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the child when dropped, unless it was taken back.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(Some(child))
    }

    /// The child, no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("child present")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("child present")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Builds a `wagate serve` process: an empty environment but `PATH`, the
/// variables given, standard output discarded, standard error to a log
/// file (or discarded).
#[derive(Debug, Clone, Default)]
pub struct GatewayProcess {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    log: Option<PathBuf>,
}

impl GatewayProcess {
    pub fn new() -> GatewayProcess {
        GatewayProcess {
            args: vec!["serve".into()],
            ..Default::default()
        }
    }

    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.insert(k.to_string(), v.to_string());
        self
    }

    pub fn envs<K: ToString, V: ToString>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in vars {
            self.env.insert(k.to_string(), v.to_string());
        }
        self
    }

    /// Leaves a variable out (for a test of what happens without it).
    pub fn without(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    pub fn arg(mut self, a: impl ToString) -> Self {
        self.args.push(a.to_string());
        self
    }

    /// Standard error to `path`.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Standard error to `name` in the test's scratch directory.
    pub fn log(self, name: &str) -> Self {
        let dir = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        self.log_to(dir.join(name))
    }

    pub fn spawn(self) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wagate"));
        cmd.args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        match &self.log {
            Some(p) => cmd.stderr(std::fs::File::create(p).expect("gateway log")),
            None => cmd.stderr(Stdio::null()),
        };
        Running {
            child: KillOnDrop::new(cmd.spawn().expect("start wagate")),
            log: self.log,
        }
    }
}

/// A running `wagate`: killed when dropped.
pub struct Running {
    child: KillOnDrop,
    pub log: Option<PathBuf>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (the graceful shutdown).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -TERM {}", self.pid());
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self
            .log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The child, no longer killed on drop.
    pub fn into_child(self) -> Child {
        self.child.into_inner()
    }
}
