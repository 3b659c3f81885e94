//! `lifecycle`: every way a worker can leave, and the events the primary sees.
//!
//! The Rust form of Node's `cluster.on('exit', (worker, code, signal) => ...)` example with
//! `worker.exitedAfterDisconnect`. Five workers, respawn off (Node's manual mode):
//!
//! | worker | what happens                               | exit    | exitedAfterDisconnect |
//! |--------|--------------------------------------------|---------|-----------------------|
//! | 1      | returns 0 from its function                | code 0  | false                 |
//! | 2      | returns 7                                  | code 7  | false                 |
//! | 3      | `primary.kill(3, Signal::TERM)`            | SIGTERM | false                 |
//! | 4      | `primary.kill(4, Signal::KILL)`            | SIGKILL | false                 |
//! | 5      | `primary.disconnect(5)`: it returns 0      | code 0  | true                  |
//!
//! Every event is printed on stdout, one line each; the program exits 0 once all are gone.
//!
//! ```text
//! cargo run --example lifecycle
//! ```

use std::os::unix::process::ExitStatusExt;

use forkcluster::{Cluster, Event, Next, Signal, Worker};

fn main() -> forkcluster::Result<()> {
    let mut primary = Cluster::builder().workers(5).respawn(false).start(work)?;
    while let Some(event) = primary.next_event()? {
        match event {
            Event::Online { id } => {
                println!("worker {id} online");
                match id {
                    3 => primary.kill(id, Signal::TERM)?,
                    4 => primary.kill(id, Signal::KILL)?,
                    5 => primary.disconnect(id)?,
                    _ => {}
                }
            }
            Event::Exit {
                id,
                pid,
                status,
                exited_after_disconnect,
            } => {
                let how = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("code {code}"),
                    (None, Some(sig)) => signal_name(sig),
                    (None, None) => format!("{status}"),
                };
                println!(
                    "worker {id} (pid {pid}) died ({how}), exitedAfterDisconnect: {exited_after_disconnect}"
                );
                if exited_after_disconnect {
                    println!("worker {id}: Oh, it was just voluntary – no need to worry");
                }
                // Without respawn, the cluster would wait for work forever: leave when empty.
                if primary.workers().next().is_none() {
                    break;
                }
            }
            event => println!("{event}"),
        }
    }
    println!("all workers gone");
    Ok(())
}

/// The worker: 1 and 2 return at once; the others wait for the primary.
fn work(mut worker: Worker) -> forkcluster::Result<i32> {
    match worker.id() {
        1 => return Ok(0),
        2 => return Ok(7),
        _ => {}
    }
    while let Some(next) = worker.next()? {
        if let Next::Disconnect = next {
            break;
        }
    }
    Ok(0)
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        _ => format!("signal {sig}"),
    }
}
