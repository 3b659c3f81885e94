//! Shared test helpers: a fork-per-test runner, deadlines, fd counting, child cleanup.
//!
//! Why a runner of our own (`harness = false`): libtest runs every test on a spawned thread, and
//! a forking primary needs a single-threaded process (a blocked SIGCHLD must not be delivered to
//! another thread that does not block it, and `fork` is only sound without other threads). So each
//! test runs in its own forked child of a single-threaded runner, under `alarm()` so that a hung
//! test is killed, and the runner reaps it. Workers a test forks die with it (`PR_SET_PDEATHSIG`).
//!
//! Output follows libtest's: `test NAME ... ok`, and a closing
//! `test result: ok. N passed; M failed; ...` line.
#![allow(dead_code)]

pub mod cl;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// One test: its name, its time limit in seconds, and the function.
pub struct Test {
    pub name: &'static str,
    pub secs: u32,
    pub f: fn(),
}

/// Declares a list of tests for [`run`]: `tests![a, b => 30, c]` (`=> secs` overrides the
/// default 20 s limit).
#[macro_export]
macro_rules! tests {
    ($($name:ident $(=> $secs:expr)?),* $(,)?) => {
        &[$($crate::util::Test { name: stringify!($name), secs: { let _s = 20; $(let _s = $secs;)? _s }, f: $name }),*]
    };
}

/// Runs `tests` (filtered by the command line's first free argument, as libtest does), each in a
/// forked child with its time limit, and exits with 0 when all pass.
pub fn run(tests: &[Test]) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for t in tests {
            println!("{}: test", t.name);
        }
        std::process::exit(0);
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| match &filter {
            Some(f) if exact => t.name == f,
            Some(f) => t.name.contains(f.as_str()),
            None => true,
        })
        .collect();
    let start = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    let mut failures = Vec::new();
    for t in &selected {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let t0 = Instant::now();
        // SAFETY (test code): the runner is single-threaded.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // Own process group, so the runner can kill everything the test left behind.
            unsafe { libc::setpgid(0, 0) };
            unsafe { libc::alarm(t.secs) };
            let ok = std::panic::catch_unwind(t.f).is_ok();
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            unsafe { libc::_exit(if ok { 0 } else { 101 }) };
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        // Anything the test left in its process group goes now.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let how = if ok {
            "ok".to_string()
        } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGALRM {
            format!("FAILED (timed out after {} s)", t.secs)
        } else if libc::WIFSIGNALED(status) {
            format!("FAILED (signal {})", libc::WTERMSIG(status))
        } else {
            format!("FAILED (exit {})", libc::WEXITSTATUS(status))
        };
        println!(
            "test {} ... {} ({:.2}s)",
            t.name,
            how,
            t0.elapsed().as_secs_f64()
        );
        if ok {
            passed += 1;
        } else {
            failed += 1;
            failures.push(t.name);
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for f in &failures {
            println!("    {f}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        passed,
        failed,
        tests.len() - selected.len(),
        start.elapsed().as_secs_f64()
    );
    std::process::exit(if failed == 0 { 0 } else { 101 });
}

/// Polls `cond` every 5 ms until it is true or `limit` passes; returns whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The fds open in process `pid` (`/proc/PID/fd`), as `(fd, link target)`.
pub fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let fd: i32 = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path())
                        .ok()?
                        .to_string_lossy()
                        .into_owned();
                    Some((fd, target))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The number of fds open in this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether `fd` has close-on-exec set.
pub fn is_cloexec(fd: &impl AsRawFd) -> bool {
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the parenthesized comm
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("X");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// The pids of this process's children (from `/proc/*/stat` ppid).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                let mut it = s.rsplit(')').next().unwrap_or("").split_whitespace();
                let _state = it.next();
                if it.next().and_then(|pp| pp.parse::<i32>().ok()) == Some(pid) {
                    v.push(p);
                }
            }
        }
    }
    v.sort();
    v
}

/// Kills `pid` on drop (a child the test started), then reaps it.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.0, &mut st, 0);
        }
    }
}

/// Forks a child that runs `f` and exits with its return value. The child is single-threaded
/// (the runner is), so it may do anything.
pub fn fork_child(f: impl FnOnce() -> i32) -> i32 {
    let _ = std::io::stdout().flush();
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for child `pid` for at most `limit`; returns its raw wait status, or kills it and panics.
pub fn wait_child(pid: i32, limit: Duration) -> i32 {
    let end = Instant::now() + limit;
    loop {
        let mut st = 0;
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return st;
        }
        if Instant::now() >= end {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            panic!("child {pid} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `Content-Length` of an HTTP header block (case-insensitive name).
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Whether this test runs under qemu-user, found from the kernel's view of the executable.
///
/// qemu answers `/proc/self/exe` with the guest program, but not the same link reached through
/// the task directory, which still names the qemu binary the kernel runs. On a real kernel the
/// two agree and name the test binary.
pub fn under_qemu() -> bool {
    let pid = std::process::id();
    std::fs::read_link(format!("/proc/self/task/{pid}/exe"))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("qemu-"))
        })
        .unwrap_or(false)
}

/// Where this test binary was built, and so where the examples built for the same target and
/// profile live: `<target dir>/[<triple>/]<profile dir>/deps/<test>-<hash>`. The `<triple>`
/// level is there when cargo was given `--target` (cross-testing), and then the examples are
/// built for that triple and run through its runner.
pub struct Examples {
    /// The cargo target directory (it holds `CACHEDIR.TAG`), when the binary is in one.
    pub target_dir: Option<std::path::PathBuf>,
    /// The `--target` triple, when the binary was built for one.
    pub triple: Option<String>,
    /// `<target dir>/[<triple>/]<profile dir>`.
    pub profile_dir: std::path::PathBuf,
}

impl Examples {
    /// Finds the layout from this test binary's path.
    pub fn locate() -> Examples {
        use std::path::Path;
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <profile dir>/deps")
            .to_path_buf();
        let is_target_dir = |d: &Path| d.join("CACHEDIR.TAG").is_file();
        let up = profile_dir.parent();
        // The outer level first: cargo writes a `CACHEDIR.TAG` into `<target dir>/<triple>` too.
        let (target_dir, triple) = match (up, up.and_then(Path::parent)) {
            (Some(tr), Some(t)) if is_target_dir(t) => (
                Some(t.to_path_buf()),
                tr.file_name().map(|n| n.to_string_lossy().into_owned()),
            ),
            (Some(t), _) if is_target_dir(t) => (Some(t.to_path_buf()), None),
            _ => (None, None),
        };
        Examples {
            target_dir,
            triple,
            profile_dir,
        }
    }

    /// Builds the examples `names` (all of them when empty) with cargo, for this binary's target
    /// and profile, into its target directory; a no-op when they are fresh. Nothing happens
    /// outside a cargo target directory (the binaries must then be there already).
    pub fn build(&self, names: &[&str]) {
        let Some(target_dir) = &self.target_dir else {
            return;
        };
        let profile = match self.profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var_os("CARGO")
            .or_else(|| option_env!("CARGO").map(Into::into))
            .unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--profile", &profile])
            .arg("--manifest-path")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .stdin(std::process::Stdio::null());
        if names.is_empty() {
            cmd.arg("--examples");
        }
        for n in names {
            cmd.args(["--example", n]);
        }
        if let Some(t) = &self.triple {
            cmd.args(["--target", t]);
        }
        let st = cmd.status().expect("run cargo build for the examples");
        assert!(st.success(), "cargo build {names:?} failed: {st}");
    }

    /// The path of example `name`.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.profile_dir.join("examples").join(name)
    }

    /// A command that runs example `name`: through the target's runner when the environment
    /// names one (`CARGO_TARGET_<TRIPLE>_RUNNER`, split on whitespace as cargo does, e.g.
    /// `qemu-aarch64 -L /usr/aarch64-linux-gnu`), else directly. The runner execs the program
    /// in the same process, so the child's pid is the example's.
    pub fn command(&self, name: &str) -> std::process::Command {
        let path = self.path(name);
        assert!(
            path.is_file(),
            "{} not found: build it with `cargo build --examples` (plain `cargo test` does)",
            path.display()
        );
        // An example built for another machine than this test (a host build left in a
        // cross-target directory) would make the tests pass for the wrong binary.
        let machine = |p: &std::path::Path| {
            let mut head = [0u8; 20];
            std::fs::File::open(p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .map(|()| (head[4], head[5], [head[18], head[19]]))
                .unwrap_or_else(|e| panic!("read the ELF header of {}: {e}", p.display()))
        };
        let exe = std::env::current_exe().expect("current_exe");
        assert_eq!(
            machine(&path),
            machine(&exe),
            "{} is not built for the machine of {} (ELF class, byte order, machine)",
            path.display(),
            exe.display()
        );
        let runner = self.triple.as_ref().and_then(|t| {
            let var = format!(
                "CARGO_TARGET_{}_RUNNER",
                t.to_uppercase().replace(['-', '.'], "_")
            );
            std::env::var(var).ok()
        });
        let mut words = runner.iter().flat_map(|r| r.split_whitespace());
        match words.next() {
            Some(prog) => {
                let mut c = std::process::Command::new(prog);
                c.args(words).arg(path);
                c
            }
            None => std::process::Command::new(path),
        }
    }
}
