//! `exec_primary`: a cluster whose workers are another program (Node's
//! `cluster.setupPrimary({ exec: 'worker.js' })`).
//!
//! The primary binds the port and forks the workers; each one execs `exec_worker`, found next to
//! this program (`std::env::current_exe()`'s directory; `--worker PATH` names another), which
//! calls `Worker::from_env()` and serves `hello from exec'd worker <id>`. When a worker is
//! online the primary sends it `ping` and prints its `pong`. Every event is one stderr line.
//! SIGHUP restarts the workers one by one, exec'ing the program again: a new `exec_worker`
//! binary is picked up without restarting the primary.
//!
//! ```text
//! cargo build --examples
//! target/debug/examples/exec_primary [--listen ADDR] [--workers N] [--schedule rr|shared] [--worker PATH]
//! curl http://127.0.0.1:8080/   # hello from exec'd worker 1
//! ```

use std::path::PathBuf;

use forkcluster::{Cluster, Event, Schedule};

fn usage(msg: &str) -> ! {
    eprintln!("exec_primary: {msg}");
    eprintln!(
        "usage: exec_primary [--listen ADDR] [--workers N] [--schedule rr|shared] [--worker PATH]"
    );
    std::process::exit(2)
}

fn main() -> forkcluster::Result<()> {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut workers = 2;
    let mut schedule = Schedule::RoundRobin;
    let mut program: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage("missing value"));
        match a.as_str() {
            "--listen" => listen = value(),
            "--workers" => workers = value().parse().unwrap_or_else(|_| usage("bad --workers")),
            "--schedule" => {
                schedule = Schedule::from_name(&value())
                    .unwrap_or_else(|| usage("--schedule is rr, shared, reuseport, lc or sticky"))
            }
            "--worker" => program = Some(value().into()),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let program = match program {
        Some(p) => p,
        None => {
            let me = std::env::current_exe().map_err(forkcluster::Error::from)?;
            me.with_file_name("exec_worker")
        }
    };
    let mut primary = Cluster::builder()
        .listen(listen.parse().unwrap_or_else(|_| usage("bad --listen")))
        .workers(workers)
        .schedule(schedule)
        .exec(&program)
        .start_exec()?;
    eprintln!(
        "exec_primary: pid {}, workers exec {}",
        std::process::id(),
        program.display()
    );
    while let Some(event) = primary.next_event()? {
        match &event {
            Event::Online { id } => {
                let id = *id;
                eprintln!("{event}");
                primary.send(id, b"ping")?;
            }
            Event::Message { id, payload, .. } => {
                eprintln!("worker {id} says: {}", String::from_utf8_lossy(payload));
            }
            _ => eprintln!("{event}"),
        }
    }
    Ok(())
}
