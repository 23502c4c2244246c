//! `lockstep reconcile`: one reconciliation pass over a realm, outside the service.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::{StoreArgs, open_store, realm_policies, settings};
use crate::oidc::keycloak_admin::{AdminSettings, KeycloakAdmin};
use crate::oidc::tls::TrustRoots;
use crate::sync::reconcile::Reconciler;
use crate::sync::sessions::SessionService;

/// `reconcile` flags.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The realm, as named in the config file.
    #[arg(long, env = "LOCKSTEP_RECONCILE_REALM")]
    pub realm: String,
    /// Decide and print what would end, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// PEM file of extra certificate authorities for HTTPS to Keycloak (`[tls] ca_file`).
    #[arg(long, env = "LOCKSTEP_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Storage.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `lockstep reconcile`: one pass over the realm, printing what it ends (or would).
pub(super) async fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let file = args.store.file()?;
    let realm = file
        .realm_policies()?
        .remove(&args.realm)
        .ok_or_else(|| anyhow::anyhow!("realm {:?} is not in the config file", args.realm))?;
    let settings = AdminSettings::from_config(&args.realm, &realm)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "realm {:?} has no [realms.{}.reconcile] (Keycloak admin access)",
                args.realm,
                args.realm
            )
        })?;
    let ca_file = settings::tls_ca_file(args.tls_ca_file.as_ref(), &file);
    let roots = TrustRoots::load(ca_file.as_deref()).context("config: [tls] ca_file")?;
    let admin = Arc::new(KeycloakAdmin::new(settings, &roots)?);
    let store = open_store(&settings::store(&args.store, &file)?).await?;
    let sessions = SessionService::new(store.clone(), realm_policies(&file)?);
    let result = Reconciler::new(sessions, admin).pass(args.dry_run).await;
    store.close().await;
    let report = result?;
    let verb = if args.dry_run { "would end" } else { "ended" };
    for gone in &report.gone {
        println!(
            "keycloak session {} is gone: {verb} {}",
            gone.sid,
            gone.parents.join(", ")
        );
        for s in &gone.ended {
            println!(
                "  ended {} ({}, {})",
                s.external_id,
                s.kind,
                s.end_reason.map_or("-", |r| r.as_str())
            );
        }
    }
    let ended: usize = report.gone.iter().map(|g| g.ended.len()).sum();
    println!(
        "realm {}: {} PARENTs checked, {} Keycloak sessions gone, {} sessions ended, {} left \
         alone, {} failed calls, {} calls to Keycloak{}",
        args.realm,
        report.checked,
        report.gone.len(),
        ended,
        report.unsure,
        report.errors,
        report.calls,
        if args.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    if let Some(why) = report.stopped {
        anyhow::bail!("the pass stopped early: {why}");
    }
    if report.errors > 0 {
        anyhow::bail!(
            "{} calls to Keycloak failed; the sessions they were about were left alone",
            report.errors
        );
    }
    Ok(())
}
