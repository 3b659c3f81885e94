//! `jobs`: a worker pool without a listener, driven by messages.
//!
//! Node's `worker.send(message)` / `process.on('message')` example (the primary sends, the worker
//! answers with `process.send`) turned into a job queue: the primary sends each idle worker a
//! number to factor, the worker sends back the prime factors, and the primary prints them and
//! hands that worker the next number. When every result is in,
//! the primary stops the cluster (`primary.stop(true)`: every worker is asked to disconnect) and
//! exits 0. A job held by a worker that dies is given to another one.
//!
//! ```text
//! cargo run --example jobs -- [--workers N] [NUMBER...]
//! ```
//!
//! Without numbers it factors a built-in list. Each result is one line on stdout:
//! `worker <id>: <n> = <p1> * <p2> * ...`.

use std::collections::{HashMap, VecDeque};

use forkcluster::{Cluster, Event, Next, Worker};

const DEFAULT_JOBS: &[u64] = &[
    600_851_475_143,
    9_007_199_254_740_993,
    18_446_744_073_709_551_615,
    999_985_999_949,
    999_999_999_989,
    123_456_789_012,
    2_147_483_647,
    4_294_967_297,
];

fn usage(msg: &str) -> ! {
    eprintln!("jobs: {msg}");
    eprintln!("usage: jobs [--workers N] [NUMBER...]   (numbers >= 2)");
    std::process::exit(2)
}

fn main() -> forkcluster::Result<()> {
    let mut workers = None;
    let mut queue = VecDeque::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--workers" {
            let n = args.next().and_then(|v| v.parse().ok());
            workers = Some(n.unwrap_or_else(|| usage("bad --workers")));
        } else {
            match a.parse::<u64>() {
                Ok(n) if n >= 2 => queue.push_back(n),
                _ => usage(&format!("not a number >= 2: {a}")),
            }
        }
    }
    if queue.is_empty() {
        queue.extend(DEFAULT_JOBS);
    }

    let mut builder = Cluster::builder();
    if let Some(n) = workers {
        builder = builder.workers(n);
    }
    let mut primary = builder.start(factor_worker)?;
    // The job each busy worker holds.
    let mut busy: HashMap<u32, u64> = HashMap::new();
    let mut idle: Vec<u32> = Vec::new();

    while let Some(event) = primary.next_event()? {
        match event {
            Event::Online { id } => idle.push(id),
            Event::Message { id, payload, .. } => {
                println!("worker {id}: {}", String::from_utf8_lossy(payload));
                busy.remove(&id);
                idle.push(id);
                if queue.is_empty() && busy.is_empty() {
                    primary.stop(true);
                }
            }
            // A worker that disconnected or is gone takes no more jobs, and cannot answer: the
            // job it held goes to another one.
            Event::Disconnect { id } => {
                idle.retain(|&w| w != id);
                if let Some(n) = busy.remove(&id) {
                    queue.push_front(n);
                }
            }
            _ => {}
        }
        // Hand out work to idle workers.
        while let (Some(&id), Some(&n)) = (idle.last(), queue.front()) {
            if primary.is_stopping() {
                break;
            }
            idle.pop();
            if primary.send(id, n.to_string().as_bytes()).is_ok() {
                queue.pop_front();
                busy.insert(id, n);
            }
        }
    }
    Ok(())
}

/// The worker: factor each number it is sent, reply `n = p1 * p2 * ...`.
fn factor_worker(mut worker: Worker) -> forkcluster::Result<()> {
    while let Some(next) = worker.next()? {
        let n = match next {
            Next::Message(msg) => std::str::from_utf8(msg.payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok()),
            Next::Connection(_) => None,
            Next::Disconnect => break,
        };
        if let Some(n) = n {
            let factors: Vec<String> = factor(n).iter().map(u64::to_string).collect();
            worker.send(format!("{n} = {}", factors.join(" * ")).as_bytes())?;
        }
    }
    Ok(())
}

/// Prime factors by trial division, smallest first.
fn factor(mut n: u64) -> Vec<u64> {
    let mut factors = Vec::new();
    let mut d = 2u64;
    while d.saturating_mul(d) <= n {
        while n % d == 0 {
            factors.push(d);
            n /= d;
        }
        d += if d == 2 { 1 } else { 2 };
    }
    if n > 1 {
        factors.push(n);
    }
    factors
}
