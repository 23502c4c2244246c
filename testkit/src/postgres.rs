//! Scratch databases on a PostgreSQL server, from its admin URL
//! (`postgres://user@host:port/postgres`).

use sqlx::{Connection, Executor, PgConnection};

use crate::Error;

/// Whether the tests of the PostgreSQL backend are skipped on purpose
/// (`LOCKSTEP_SKIP_POSTGRES=1`).
pub fn skipped() -> bool {
    std::env::var("LOCKSTEP_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// The admin URL of the PostgreSQL server tests run against (`LOCKSTEP_TEST_DATABASE_URL`,
/// else `DATABASE_URL`), or `None` when they are [`skipped`]. Neither set and not skipped
/// panics: a suite that quietly left out its PostgreSQL half would pass without testing it.
pub fn test_server() -> Option<String> {
    if skipped() {
        return None;
    }
    let url =
        std::env::var("LOCKSTEP_TEST_DATABASE_URL").or_else(|_| std::env::var("DATABASE_URL"));
    match url {
        Ok(url) => Some(url),
        Err(_) => panic!(
            "PostgreSQL tests need LOCKSTEP_TEST_DATABASE_URL (bash scripts/test.sh starts a \
             throwaway cluster and sets it); set LOCKSTEP_SKIP_POSTGRES=1 to skip them"
        ),
    }
}

/// `prefix` followed by a random suffix: unique among the tests and runs sharing a server.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// `admin_url` with its database replaced by `name` (user, host, port and parameters kept).
pub fn database_url(admin_url: &str, name: &str) -> Result<String, Error> {
    let bad = || Error::PostgresUrl(admin_url.to_owned());
    let (url, query) = match admin_url.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = url.find("://").ok_or_else(bad)? + 3;
    let base = match url[authority_start..].find('/') {
        Some(slash) => &url[..authority_start + slash],
        None => url,
    };
    Ok(match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    })
}

/// Creates the empty database `name`; returns its URL.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, Error> {
    let url = database_url(admin_url, name)?;
    let sql = format!("CREATE DATABASE \"{name}\"");
    admin_statement(admin_url, &sql, format!("CREATE DATABASE {name}")).await?;
    Ok(url)
}

/// Drops the database `name` if it exists, ending its connections first.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), Error> {
    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    admin_statement(admin_url, &sql, format!("DROP DATABASE {name}")).await
}

/// Runs `sql` on a connection of its own to the admin database, closed afterwards; `what`
/// names the statement in the error.
async fn admin_statement(admin_url: &str, sql: &str, what: String) -> Result<(), Error> {
    let mut conn = connect(admin_url).await?;
    conn.execute(sql)
        .await
        .map_err(|source| Error::Postgres { what, source })?;
    let _ = conn.close().await;
    Ok(())
}

async fn connect(admin_url: &str) -> Result<PgConnection, Error> {
    PgConnection::connect(admin_url)
        .await
        .map_err(|source| Error::Postgres {
            what: format!("connecting to {admin_url}"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced_and_the_rest_kept() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:55432/postgres",
                "postgres://postgres@127.0.0.1:55432/x",
            ),
            (
                "postgres://u:p@h/postgres?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgres://u@h:5432", "postgres://u@h:5432/x"),
        ];
        for (admin, want) in cases {
            assert_eq!(
                database_url(admin, "x").ok().as_deref(),
                Some(want),
                "{admin}"
            );
        }
        assert!(database_url("not a url", "x").is_err());
    }
}
