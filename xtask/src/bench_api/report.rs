//! The summary printed at the end of a run: markdown tables, padded so that they read in a
//! terminal and paste into `docs/benchmarks.md` as they are.

use std::time::Duration;

use super::ceiling::{Ceilings, IndexCosts, Variant, median};
use super::cpu::CpuUse;
use super::load::PhaseStats;
use super::{Args, BackendReport, TREE_LEVELS};

/// API phases that write what a map-parent writes or about as much, so that the ceilings
/// are a fair yardstick (the grown-table reruns are not: the ceilings run on empty tables).
const WRITE_PHASES: [&str; 3] = ["map-parent", "map-child", "destroy-parent"];

/// A markdown table whose columns are padded to their widest cell.
struct Table {
    header: Vec<String>,
    /// Right-aligned (numeric) columns.
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&str, bool)]) -> Self {
        Table {
            header: columns.iter().map(|(h, _)| (*h).to_owned()).collect(),
            right: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
                .max(3)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let c = cells.get(i).map_or("", String::as_str);
                    let pad = " ".repeat(w.saturating_sub(c.chars().count()));
                    if self.right[i] {
                        format!("{pad}{c}")
                    } else {
                        format!("{c}{pad}")
                    }
                })
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(&self.header);
        // Each cell spans its width plus the space either side; a colon marks the right.
        let rule: Vec<String> = widths
            .iter()
            .zip(&self.right)
            .map(|(&w, &r)| {
                if r {
                    format!("{}:", "-".repeat(w + 1))
                } else {
                    "-".repeat(w + 2)
                }
            })
            .collect();
        println!("|{}|", rule.join("|"));
        for r in &self.rows {
            line(r);
        }
    }
}

/// 12345.6 → "12,346".
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn ms(x: f64) -> String {
    format!("{x:.2}")
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".to_owned(), f)
}

fn us(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn pct(x: f64) -> String {
    // `+ 0.0` turns the -0 of a tiny negative share into 0.
    format!("{:.0} %", x.round() + 0.0)
}

fn server_cpu(c: &CpuUse) -> Option<Duration> {
    c.server
}
fn postgres_cpu(c: &CpuUse) -> Option<Duration> {
    c.postgres
}
fn harness_cpu(c: &CpuUse) -> Option<Duration> {
    c.harness
}

fn synchronous(args: &Args) -> &'static str {
    match args.durability {
        super::Durability::Normal => "NORMAL",
        super::Durability::Fsync => "FULL",
    }
}

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
        "settings:    durability={} (SQLite synchronous={}) concurrency={} ops={} group={} seconds-cap={} trees={} filler-realm={}; {cores} cores shared by client, server and database",
        args.durability.as_str(),
        synchronous(args),
        args.concurrency,
        args.ops,
        args.group,
        args.seconds_cap,
        args.trees,
        args.filler_realm,
    );
    println!(
        "CPU:         utime+stime from /proc/<pid>/stat per request (10 ms ticks); postgres = the \
         whole cluster, harness = this load client (and pgbench in the ceilings)"
    );

    api_table(reports, args);
    ceiling_table(reports, args);
    index_tables(reports);
    cascade_table(reports);
    problems(reports);
}

fn api_table(reports: &[BackendReport], args: &Args) {
    let with_pg = reports
        .iter()
        .flat_map(|r| &r.phases)
        .any(|p| p.cpu_us_per_request(postgres_cpu).is_some());
    let group = reports
        .iter()
        .filter_map(|r| r.ceiling.as_ref()?.group.as_ref())
        .map(|g| g.requests_per_op)
        .next();
    let mut columns = vec![
        ("backend", false),
        ("phase", false),
        ("ops", true),
        ("errors", true),
        ("ops/s", true),
        ("p50 ms", true),
        ("p99 ms", true),
        ("server CPU µs/req", true),
    ];
    if with_pg {
        columns.push(("postgres CPU µs/req", true));
    }
    columns.push(("harness CPU µs/req", true));
    columns.push(("% of 1 req/tx ceiling", true));
    let group_header = group.map(|g| format!("% of {g} req/tx ceiling"));
    if let Some(h) = &group_header {
        columns.push((h.as_str(), true));
    }
    let mut t = Table::new(&columns);
    for r in reports {
        let ceiling = r.ceiling.as_ref();
        for p in &r.phases {
            let vs = |c: Option<&PhaseStats>| {
                let c = c.filter(|_| WRITE_PHASES.contains(&p.name.as_str()))?;
                (c.requests_per_sec() > 0.0).then(|| 100.0 * p.ops_per_sec() / c.requests_per_sec())
            };
            let mut row = vec![
                r.backend.to_owned(),
                format!("{}{}", p.name, if p.capped() { " (time cap)" } else { "" }),
                p.ops.to_string(),
                p.errors.to_string(),
                thousands(p.ops_per_sec()),
                ms(p.percentile_ms(50.0)),
                ms(p.percentile_ms(99.0)),
                opt(p.cpu_us_per_request(server_cpu), us),
            ];
            if with_pg {
                row.push(opt(p.cpu_us_per_request(postgres_cpu), us));
            }
            row.push(opt(p.cpu_us_per_request(harness_cpu), us));
            row.push(opt(vs(ceiling.map(|c| &c.single)), pct));
            if group.is_some() {
                row.push(opt(vs(ceiling.and_then(|c| c.group.as_ref())), pct));
            }
            t.row(row);
        }
    }
    println!();
    println!(
        "API: {} concurrent keep-alive clients. % of ceiling = API ops/s ÷ ceiling requests/s \
         below (write phases on the base table only).",
        args.concurrency
    );
    t.print();
}

fn ceiling_table(reports: &[BackendReport], args: &Args) {
    let with_ceilings: Vec<(&BackendReport, &Ceilings)> = reports
        .iter()
        .filter_map(|r| Some((r, r.ceiling.as_ref()?)))
        .collect();
    let Some(payload) = with_ceilings.first().map(|(_, c)| c.payload_bytes) else {
        return;
    };
    println!();
    println!(
        "Write ceilings: per request one `sessions` PARENT, one `outbox` login event \
         ({payload}-byte payload) and one `audit` record, as the server writes a map-parent, \
         without the server, on a database set up by `lockstep migrate` (the same indexes); \
         SQLite synchronous={}, PostgreSQL as configured.",
        synchronous(args)
    );
    let mut t = Table::new(&[
        ("backend", false),
        ("ceiling", false),
        ("how", false),
        ("tx/s", true),
        ("requests/s", true),
        ("p50 ms", true),
        ("p99 ms", true),
        ("postgres CPU µs/req", true),
        ("harness CPU µs/req", true),
    ]);
    for (r, c) in with_ceilings {
        for (stats, how) in [
            (Some(&c.single), c.how.clone()),
            (
                c.group.as_ref(),
                format!("{}, a savepoint per request", c.how),
            ),
        ] {
            let Some(s) = stats else { continue };
            t.row(vec![
                r.backend.to_owned(),
                format!("{}{}", s.name, if s.capped() { " (time cap)" } else { "" }),
                how,
                thousands(s.ops_per_sec()),
                thousands(s.requests_per_sec()),
                ms(s.percentile_ms(50.0)),
                ms(s.percentile_ms(99.0)),
                opt(s.cpu_us_per_request(postgres_cpu), us),
                opt(s.cpu_us_per_request(harness_cpu), us),
            ]);
        }
    }
    t.print();
}

fn index_tables(reports: &[BackendReport]) {
    for r in reports {
        let Some(costs) = r.ceiling.as_ref().and_then(|c| c.index_costs.as_ref()) else {
            continue;
        };
        index_table(r.backend, costs);
    }
}

fn index_table(backend: &str, costs: &IndexCosts) {
    let rate = |v: &Variant| median(&v.runs.iter().map(|r| r.rate).collect::<Vec<_>>());
    // CPU per request where every run measured it, else nothing.
    let cpu = |v: &Variant| -> Option<f64> {
        let all: Option<Vec<f64>> = v.runs.iter().map(|r| r.cpu_us).collect();
        all.filter(|a| !a.is_empty()).map(|a| median(&a))
    };
    let range = |xs: Vec<f64>| {
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let wal_fmt = |x: f64| {
        if x.abs() >= 100.0 {
            thousands(x)
        } else {
            format!("{x:.2}")
        }
    };
    let base = &costs.baseline;
    let (base_rate, base_cpu) = (rate(base), cpu(base));
    let mut rows: Vec<((f64, f64), Vec<String>)> = costs
        .without
        .iter()
        .map(|v| {
            let wal_cost = base.wal.zip(v.wal).map(|(a, w)| a - w);
            let cpu_cost = base_cpu.zip(cpu(v)).map(|(a, w)| a - w);
            (
                (wal_cost.unwrap_or(0.0), cpu_cost.unwrap_or(0.0)),
                vec![
                    backend.to_owned(),
                    v.name.clone(),
                    v.definition.clone(),
                    opt(wal_cost, wal_fmt),
                    opt(cpu_cost, us),
                    opt(cpu_cost.zip(base_cpu).map(|(c, a)| 100.0 * c / a), pct),
                    thousands(rate(v)),
                ],
            )
        })
        .collect();
    rows.sort_by(|a, b| b.0.0.total_cmp(&a.0.0).then(b.0.1.total_cmp(&a.0.1)));
    println!();
    println!(
        "What each `sessions` index costs a map-parent ({backend}: {}; median of {} rounds in \
         rotating order; CPU = {}).",
        costs.how,
        base.runs.len(),
        costs.cpu_of,
    );
    let mut with_all = Vec::new();
    if let Some(w) = base.wal {
        with_all.push(format!("{} {}", wal_fmt(w), costs.wal_unit));
    }
    if let Some(c) = base_cpu {
        let (lo, hi) = range(base.runs.iter().filter_map(|r| r.cpu_us).collect());
        with_all.push(format!(
            "{} CPU µs/req (rounds {}–{})",
            us(c),
            us(lo),
            us(hi)
        ));
    }
    let (lo, hi) = range(base.runs.iter().map(|r| r.rate).collect());
    with_all.push(format!(
        "{} req/s (rounds {}–{})",
        thousands(base_rate),
        thousands(lo),
        thousands(hi)
    ));
    println!(
        "With every index: {}. The WAL figure hardly moves between runs (an index the row \
         never enters adds none); a CPU or rate difference within the spread of the rounds is \
         noise.",
        with_all.join(", ")
    );
    let wal_header = format!("{} it adds", costs.wal_unit);
    let mut t = Table::new(&[
        ("backend", false),
        ("index", false),
        ("definition", false),
        (wal_header.as_str(), true),
        ("CPU µs/req it costs", true),
        ("share of CPU", true),
        ("req/s without it", true),
    ]);
    for (_, row) in rows {
        t.row(row);
    }
    t.print();
}

fn cascade_table(reports: &[BackendReport]) {
    println!();
    println!(
        "Cascade: destroy-parent of the root of a {}-session tree ({} levels), per table size",
        TREE_LEVELS.iter().sum::<usize>(),
        TREE_LEVELS.len()
    );
    let mut t = Table::new(&[
        ("backend", false),
        ("table", false),
        ("rows", true),
        ("trees", true),
        ("median ms", true),
        ("min ms", true),
        ("max ms", true),
    ]);
    for r in reports {
        for c in &r.cascades {
            let ms_: Vec<f64> = c.times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            let min = ms_.iter().copied().fold(f64::INFINITY, f64::min);
            let max = ms_.iter().copied().fold(0.0, f64::max);
            t.row(vec![
                r.backend.to_owned(),
                c.label.clone(),
                thousands(c.table_rows as f64),
                c.times.len().to_string(),
                ms(c.median_ms()),
                ms(if ms_.is_empty() { 0.0 } else { min }),
                ms(max),
            ]);
        }
    }
    t.print();
}

fn problems(reports: &[BackendReport]) {
    let mut problems = Vec::new();
    for r in reports {
        if let Some(f) = &r.failure {
            problems.push(format!("{}: run aborted: {f}", r.backend));
        }
        if let Some(e) = &r.ceiling_error {
            problems.push(format!("{}: ceilings not measured: {e}", r.backend));
        }
        let ceiling_phases = r
            .ceiling
            .iter()
            .flat_map(|c| std::iter::once(&c.single).chain(&c.group));
        for p in r.phases.iter().chain(ceiling_phases) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(2673.2), "2,673");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
    }

    #[test]
    fn shares_never_print_minus_zero() {
        assert_eq!(pct(-0.2), "0 %");
        assert_eq!(pct(-3.4), "-3 %");
        assert_eq!(pct(57.5), "58 %");
    }
}
