//! The plain-text summary printed at the end of a run.

use super::{Args, BackendReport, TREE_LEVELS};

pub fn print(reports: &[BackendReport], args: &Args, command_line: &str, revision: &str) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!("== External-sessions API benchmark");
    println!("command:     {command_line}");
    if args.postgres_url.is_some() && !command_line.contains("--postgres-url") {
        println!("             (PostgreSQL URL from LOCKSTEP_TEST_DATABASE_URL)");
    }
    println!("revision:    {revision}");
    println!(
        "settings:    durability={} concurrency={} ops={} seconds-cap={} trees={} filler-realm={}; {cores} cores shared by client and server",
        args.durability.as_str(),
        args.concurrency,
        args.ops,
        args.seconds_cap,
        args.trees,
        args.filler_realm,
    );

    println!();
    println!(
        "{:<9} {:<24} {:>7} {:>6} {:>9} {:>9} {:>9}",
        "backend", "phase", "ops", "errors", "ops/s", "p50 ms", "p99 ms"
    );
    for r in reports {
        for p in &r.phases {
            println!(
                "{:<9} {:<24} {:>7} {:>6} {:>9.0} {:>9.2} {:>9.2}{}",
                r.backend,
                p.name,
                p.ops,
                p.errors,
                p.ops_per_sec(),
                p.percentile_ms(50.0),
                p.percentile_ms(99.0),
                if p.capped() { "  (time cap)" } else { "" },
            );
        }
    }

    println!();
    println!(
        "{:<9} {:<24} {:>9} {:>9} {:>9}   API map-parent as % of it",
        "backend", "raw insert ceiling", "rows/s", "p50 ms", "p99 ms"
    );
    for r in reports {
        let Some((single, batched)) = &r.ceiling else {
            continue;
        };
        let map_parent = r
            .phases
            .iter()
            .find(|p| p.name == "map-parent")
            .map(|p| p.ops_per_sec());
        for c in [single, batched] {
            let pct = match map_parent {
                Some(rate) if c.rows_per_sec() > 0.0 => {
                    format!("{:.0}%", 100.0 * rate / c.rows_per_sec())
                }
                _ => "-".to_owned(),
            };
            println!(
                "{:<9} {:<24} {:>9.0} {:>9.2} {:>9.2}   {pct}{}",
                r.backend,
                c.name,
                c.rows_per_sec(),
                c.percentile_ms(50.0),
                c.percentile_ms(99.0),
                if c.capped() { "  (time cap)" } else { "" },
            );
        }
    }

    println!();
    println!(
        "cascade: destroy-parent of the root of a {}-session tree ({} levels), per table size",
        TREE_LEVELS.iter().sum::<usize>(),
        TREE_LEVELS.len()
    );
    println!(
        "{:<9} {:<7} {:>10} {:>7} {:>10} {:>9} {:>9}",
        "backend", "table", "rows", "trees", "median ms", "min ms", "max ms"
    );
    for r in reports {
        for c in &r.cascades {
            let ms: Vec<f64> = c.times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
            let max = ms.iter().copied().fold(0.0, f64::max);
            println!(
                "{:<9} {:<7} {:>10} {:>7} {:>10.2} {:>9.2} {:>9.2}",
                r.backend,
                c.label,
                c.table_rows,
                c.times.len(),
                c.median_ms(),
                if ms.is_empty() { 0.0 } else { min },
                max,
            );
        }
    }

    let mut problems = Vec::new();
    for r in reports {
        if let Some(f) = &r.failure {
            problems.push(format!("{}: run aborted: {f}", r.backend));
        }
        for p in &r.phases {
            if let Some(e) = &p.first_error {
                problems.push(format!(
                    "{} {}: {} errors, first: {e}",
                    r.backend, p.name, p.errors
                ));
            }
            if let Some(w) = &p.first_warning {
                problems.push(format!(
                    "{} {}: {} responses not as documented, first: {w}",
                    r.backend, p.name, p.warnings
                ));
            }
        }
        for c in &r.cascades {
            if let Some(e) = &c.build.first_error {
                problems.push(format!(
                    "{} cascade {} build: {} errors, first: {e}",
                    r.backend, c.label, c.build.errors
                ));
            }
            if let Some(w) = &c.build.first_warning {
                problems.push(format!(
                    "{} cascade {}: {} responses not as documented, first: {w}",
                    r.backend, c.label, c.build.warnings
                ));
            }
            if let Some(e) = c.destroy_errors.first() {
                problems.push(format!(
                    "{} cascade {} destroy: {} errors, first: {e}",
                    r.backend,
                    c.label,
                    c.destroy_errors.len()
                ));
            }
        }
        for n in &r.notes {
            problems.push(format!("{}: {n}", r.backend));
        }
    }
    println!();
    if problems.is_empty() {
        println!("no errors");
    } else {
        println!("PROBLEMS:");
        for p in problems {
            println!("  - {p}");
        }
    }
}
