//! `cargo bench -p kubeshift-planner --bench parse_iptables`
//!
//! Generates a synthetic kube-proxy dump of 700,000 lines (the size reported in
//! kubernetes#96018), parses it several times and prints every run, the
//! median, and the peak RSS (getrusage) before and after parsing. A plain
//! binary rather than criterion: the number we care about is one wall-clock
//! parse of a huge input, and criterion adds nothing there but build time.

use std::time::Instant;

fn peak_rss_mib() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// User+system CPU seconds of this process: the machine is shared, so wall
/// time alone overstates the cost when other jobs compete for the 2 cores.
fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    // `cargo bench` passes `--bench`; a number on the command line overrides the size.
    let lines: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(700_000);
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let dump = kubeshift_planner::iptables::synth::synthetic_dump(lines);
    let actual_lines = dump.lines().count();
    let rss_input = peak_rss_mib();
    println!(
        "input: {actual_lines} lines, {:.1} MiB; peak RSS after generating it: {rss_input:.1} MiB",
        dump.len() as f64 / (1024.0 * 1024.0)
    );
    let mut times = Vec::with_capacity(runs);
    let mut cpus = Vec::with_capacity(runs);
    let mut services = 0;
    for run in 0..runs {
        let t = Instant::now();
        let c = cpu_seconds();
        let model =
            kubeshift_planner::iptables::parse_iptables_save("synthetic", &dump).expect("synthetic dump parses");
        let el = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - c;
        services = model.services.len();
        let endpoints: usize = model.services.iter().map(|s| s.endpoints.len()).sum();
        println!("run {run}: wall {el:.3} s, cpu {cpu:.3} s ({services} services, {endpoints} endpoints)");
        times.push(el);
        cpus.push(cpu);
        drop(model);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    cpus.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let median_cpu = cpus[cpus.len() / 2];
    let rss = peak_rss_mib();
    println!(
        "median wall {median:.3} s (min {:.3}, max {:.3}), median cpu {median_cpu:.3} s over {runs} runs; {services} services; peak RSS {rss:.1} MiB (parse added {:.1} MiB)",
        times[0],
        times[times.len() - 1],
        rss - rss_input
    );
}
