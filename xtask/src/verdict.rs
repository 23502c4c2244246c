//! The last lines every load harness prints: the first errors, the notes, and PASS or FAIL
//! with the reasons, so that a run reads the same whichever harness made it.

use std::process::ExitCode;

/// `errors: N of M {what}`, then the first five errors.
pub fn print_errors(errors: &[String], attempted: usize, what: &str, aborted: bool) {
    println!(
        "errors:      {} of {attempted} {what}{}",
        errors.len(),
        if aborted { " (stopped early)" } else { "" },
    );
    for e in errors.iter().take(5) {
        println!("  {e}");
    }
}

/// The notes, then `result: PASS` or `result: FAIL: ...` with every failure.
pub fn print_verdict(notes: &[String], failures: &[String]) {
    for note in notes {
        println!("note:        {note}");
    }
    if failures.is_empty() {
        println!("result:      PASS");
    } else {
        println!("result:      FAIL: {}", failures.join("; "));
    }
}

/// The exit status that goes with [`print_verdict`]: success exactly when it says PASS.
pub fn exit_code(failures: &[String]) -> ExitCode {
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
