//! `cargo bench -p kubeshift-planner --bench plan_synthetic`
//!
//! Plans a synthetic 5,000-node / 150,000-pod cluster (node and pod counts
//! only: services and policies are not planning inputs yet) and serializes
//! the plan to YAML, several times; prints each run, the median and peak RSS.

use std::time::Instant;

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let input = kubeshift_planner::planning::synthetic_input(5_000, 150_000);
    let mut times = Vec::new();
    let mut size = 0;
    for run in 0..runs {
        let t = Instant::now();
        let plan = kubeshift_planner::planning::build_plan(&input).expect("plans");
        let yaml = plan.to_yaml();
        let el = t.elapsed().as_secs_f64();
        size = yaml.len();
        println!(
            "run {run}: {el:.3} s ({} waves, {} bytes of YAML, critical path {} s)",
            plan.waves.len(),
            yaml.len(),
            plan.estimates.total_seconds
        );
        times.push(el);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    println!(
        "median {:.3} s over {runs} runs; plan YAML {:.1} MiB; peak RSS {:.1} MiB",
        times[times.len() / 2],
        size as f64 / 1048576.0,
        ru.ru_maxrss as f64 / 1024.0
    );
}
