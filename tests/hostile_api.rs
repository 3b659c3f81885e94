//! Issue 9 regression tests for the API the hardening added: the socket file's mode
//! (`Builder::unix_mode`), control signals from workers counted
//! (`ClusterStats::ignored_signals`), and a failed respawn as an event
//! (`Event::SpawnFailed`, `ClusterStats::spawn_failures`). The attacks themselves are in
//! `tests/hostile.rs`.
//!
//! | test | issue item | API |
//! |---|---|---|
//! | `unix_socket_mode_is_set_by_the_builder` | 10 | `Builder::unix_mode(u32)`: the socket file's mode, whatever the umask |
//! | `signals_from_workers_are_counted` | 5 | `ClusterStats::ignored_signals` |
//! | `failed_respawn_is_an_event` | 2 | `Event::SpawnFailed { error }`, `ClusterStats::spawn_failures` |

mod util;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use forkcluster::{Cluster, Event, Next, Primary, Worker};

fn main() {
    util::run(tests![
        unix_socket_mode_is_set_by_the_builder,
        signals_from_workers_are_counted,
        failed_respawn_is_an_event,
    ])
}

fn me() -> i32 {
    unsafe { libc::getpid() }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Event lines (`Display`), pumped until `f` holds for one; panics after `limit` or on an error.
fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(&Event<'_>) -> bool) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut log = Vec::new();
    loop {
        assert!(Instant::now() < end, "timed out; seen {log:?}");
        match p.next_event_timeout(Duration::from_millis(20)) {
            Ok(Some(Event::Idle)) => {}
            Ok(Some(e)) => {
                let hit = f(&e);
                log.push(e.to_string());
                if hit {
                    return log;
                }
            }
            Ok(None) => panic!("cluster ended; seen {log:?}"),
            Err(e) => panic!("next_event failed: {e}; seen {log:?}"),
        }
    }
}

/// Every event for `d` (errors fail the test).
fn window(p: &mut Primary, d: Duration, mut f: impl FnMut(&Event<'_>)) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        match p.next_event_timeout(Duration::from_millis(20)) {
            Ok(Some(e)) => f(&e),
            Ok(None) => return,
            Err(e) => panic!("next_event failed: {e}"),
        }
    }
}

fn idle_worker(mut w: Worker) -> i32 {
    loop {
        match w.next() {
            Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
            Ok(Some(_)) => {}
            Err(_) => return 1,
        }
    }
}

/// Item 10: the socket file's mode comes from the builder, not the umask (Node's
/// `readableAll`/`writableAll`).
fn unix_socket_mode_is_set_by_the_builder() {
    for mode in [0o660u32, 0o666, 0o600] {
        let path = std::env::temp_dir().join(format!("forkcluster-api-{}-{mode:o}.sock", me()));
        let _ = std::fs::remove_file(&path);
        let old = unsafe { libc::umask(0o077) };
        let p = Cluster::builder()
            .listen_unix(&path)
            .unix_mode(mode)
            .workers(1)
            .start(idle_worker)
            .unwrap();
        unsafe { libc::umask(old) };
        let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        drop(p);
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, mode, "socket file mode {got:o}, asked for {mode:o}");
    }
}

/// Item 5: control signals whose sender is one of the cluster's workers are ignored and
/// counted.
fn signals_from_workers_are_counted() {
    let mut p = Cluster::builder()
        .workers(2)
        .start(|mut w: Worker| -> i32 {
            if w.id() == 2 {
                for _ in 0..5 {
                    unsafe { libc::kill(libc::getppid(), libc::SIGTTIN) };
                    sleep_ms(50);
                }
                let _ = w.send(b"sent");
            }
            idle_worker(w)
        })
        .unwrap();
    pump(&mut p, Duration::from_secs(10), |e| {
        matches!(e, Event::Message { id: 2, .. })
    });
    window(&mut p, Duration::from_millis(300), |_| {});
    assert_eq!(p.stats().ignored_signals, 5);
    assert_eq!(p.wanted_workers(), 2);
}

/// Item 2: a respawn that cannot get fds is reported as an event, and retried after a backoff,
/// never a `next_event` error.
fn failed_respawn_is_an_event() {
    let mut p = Cluster::builder()
        .workers(1)
        .backoff(
            Duration::from_millis(50),
            Duration::from_millis(200),
            Duration::from_secs(1),
        )
        .start(idle_worker)
        .unwrap();
    let mut pid = 0;
    pump(&mut p, Duration::from_secs(5), |e| {
        if let Event::Fork { pid: p, .. } = e {
            pid = *p;
        }
        matches!(e, Event::Online { .. })
    });
    // Every free fd slot taken.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    let top = util::fds_of(me()).last().map_or(0, |f| f.0) as libc::rlim_t;
    let lim = libc::rlimit {
        rlim_cur: top + 32,
        rlim_max: old.rlim_max,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let mut failed = 0;
    window(&mut p, Duration::from_secs(1), |e| {
        if let Event::SpawnFailed { .. } = e {
            failed += 1;
        }
    });
    drop(hog);
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    assert!(failed >= 1, "no SpawnFailed event");
    // Backed off: 1 s with a backoff from 50 ms doubling to 200 ms allows about 7 attempts.
    assert!(
        failed <= 10,
        "{failed} SpawnFailed events in 1 s: not backing off"
    );
    assert!(p.stats().spawn_failures >= 1);
    pump(&mut p, Duration::from_secs(3), |e| {
        matches!(e, Event::Fork { .. })
    });
}
