//! `sqlx::migrate!` embeds the migration files at compile time, and cargo does not know it
//! reads them: without this, a new or edited migration is left out of an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
