//! `kizuna certs …`: the operator's commands for the municipal CA.
//!
//! Model: [`CertsCmd`] is a clap subcommand enum the `kizuna` binary embeds;
//! [`run`] executes one command and prints every file it wrote. Errors are the
//! typed [`crate::ca::CaError`]s (each naming its file), wrapped in `anyhow`
//! at this edge only.

use crate::ca;
use crate::identity::ROLE_OID_STR;
use anyhow::Context;
use crdt::{NodeId, Role};
use std::path::PathBuf;

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

fn parse_node_id(s: &str) -> Result<NodeId, String> {
    NodeId::new(s).map_err(|e| e.to_string())
}

/// Certificate authority commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertsCmd {
    /// Create a new municipal CA (refuses to overwrite an existing one).
    InitCa {
        /// Directory for ca.crt.pem, ca.key.pem (0600) and ca.state.json.
        #[arg(long)]
        dir: PathBuf,
        /// Human-readable CA name, e.g. "Kizuna CA Sendai".
        #[arg(long)]
        name: String,
    },
    /// Issue a node certificate and key signed by the CA.
    Issue {
        /// The CA directory created by init-ca.
        #[arg(long)]
        ca_dir: PathBuf,
        /// One of shelter, clinic, ambulance, facility, hq.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Node id, e.g. shelter-12 (A-Z a-z 0-9 . - _, at most 64).
        #[arg(long, value_parser = parse_node_id)]
        node_id: NodeId,
        /// Output directory for node.crt.pem, node.key.pem and ca.crt.pem.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Seal node.key.pem with the node's storage key (so the plain key
        /// never touches the disk): a key file, see `certs keygen`.
        #[command(flatten)]
        seal: StorageKeyArgs,
    },
    /// Seal a node's plain private key with its storage key, in place
    /// (atomically; the plain file is overwritten). Nodes that encrypt
    /// their data at rest refuse a plain key.
    Seal {
        /// The node.key.pem to seal.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        storage_key: StorageKeyArgs,
    },
    /// Write a new random storage key (64 hex digits, mode 0600) for a
    /// node that encrypts its data at rest; refuses to overwrite.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke every certificate of a node (or one, `--serial`) and write a
    /// new signed crl.der.
    Revoke {
        /// The CA directory created by init-ca.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node id to revoke.
        #[arg(long, value_parser = parse_node_id)]
        node_id: NodeId,
        /// Revoke only this certificate of the node (hex serial, as `issue`
        /// printed it): the old one after a rotation.
        #[arg(long)]
        serial: Option<String>,
        /// Why: `key-compromise` (a lost or stolen device; the changes the
        /// certificate signed are refused everywhere from then on) or
        /// `superseded` (the old certificate after a rotation, its key not
        /// lost; the changes it signed stay valid).
        #[arg(long, value_enum, default_value = "key-compromise")]
        reason: ca::RevokeReason,
    },
}

/// Where a storage key comes from, on the command line (at most one).
#[derive(Debug, Clone, Default, clap::Args)]
#[group(multiple = false)]
pub struct StorageKeyArgs {
    /// File holding the storage key (64 hex digits) or a passphrase.
    #[arg(long, value_name = "FILE")]
    pub storage_key_file: Option<PathBuf>,
    /// systemd credential holding it (`$CREDENTIALS_DIRECTORY/NAME`).
    #[arg(long, value_name = "NAME")]
    pub storage_key_credential: Option<String>,
    /// Read a passphrase from standard input.
    #[arg(long)]
    pub storage_key_prompt: bool,
}

impl StorageKeyArgs {
    /// The source given, if any.
    pub fn source(&self) -> Option<crate::storagekey::KeySource> {
        use crate::storagekey::KeySource;
        match (
            &self.storage_key_file,
            &self.storage_key_credential,
            self.storage_key_prompt,
        ) {
            (Some(f), _, _) => Some(KeySource::File(f.clone())),
            (_, Some(n), _) => Some(KeySource::Credential(n.clone())),
            (_, _, true) => Some(KeySource::Prompt),
            _ => None,
        }
    }
}

/// Run one command, printing what was written.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::InitCa { dir, name } => {
            let created = ca::init_ca(&dir, &name)
                .with_context(|| format!("creating CA in {}", dir.display()))?;
            println!("created municipal CA {name:?}");
            println!("  certificate: {}", created.cert_path.display());
            println!(
                "  private key: {} (mode 0600; keep this machine offline)",
                created.key_path.display()
            );
            println!("  state:       {}", created.state_path.display());
        }
        CertsCmd::Issue {
            ca_dir,
            role,
            node_id,
            out,
            days,
            seal,
        } => {
            let storage_key = seal
                .source()
                .map(|s| crate::storagekey::read(&s))
                .transpose()?;
            let issued = ca::issue_sealed_at(
                &ca_dir,
                role,
                &node_id,
                &out,
                days,
                time::OffsetDateTime::now_utc(),
                storage_key.as_ref(),
            )
            .with_context(|| {
                format!(
                    "issuing a certificate for {node_id} with the CA in {}",
                    ca_dir.display()
                )
            })?;
            println!("issued {role} certificate for node {node_id}");
            println!("  serial:      {}", issued.identity.serial_hex());
            println!(
                "  valid:       {} .. {}",
                crate::clock::fmt_time(issued.identity.not_before),
                crate::clock::fmt_time(issued.identity.not_after)
            );
            println!("  role OID:    {ROLE_OID_STR}");
            println!("  certificate: {}", issued.cert_path.display());
            println!(
                "  private key: {} (mode 0600{})",
                issued.key_path.display(),
                if storage_key.is_some() {
                    ", sealed with the storage key"
                } else {
                    ""
                }
            );
            println!("  CA copy:     {}", issued.ca_cert_path.display());
        }
        CertsCmd::Seal { key, storage_key } => {
            let source = storage_key.source().ok_or_else(|| {
                anyhow::anyhow!(
                    "give the storage key: --storage-key-file, --storage-key-credential or --storage-key-prompt"
                )
            })?;
            let k = crate::storagekey::read(&source)?;
            crate::storagekey::seal_file(&key, &k)?;
            println!("sealed {} with the {source}", key.display());
        }
        CertsCmd::Keygen { out } => {
            crate::storagekey::generate_key_file(&out)?;
            println!("wrote a new storage key to {} (mode 0600)", out.display());
            println!(
                "  keep a copy apart from the device: without it the node's data cannot be read"
            );
        }
        CertsCmd::Revoke {
            ca_dir,
            node_id,
            serial,
            reason,
        } => {
            let revoked = ca::revoke_serial_at(
                &ca_dir,
                &node_id,
                serial.as_deref(),
                reason,
                time::OffsetDateTime::now_utc(),
            )
            .with_context(|| format!("revoking {node_id} with the CA in {}", ca_dir.display()))?;
            if revoked.newly_revoked.is_empty() {
                println!("node {node_id} was already revoked; re-signed the CRL");
            } else {
                let why = match reason {
                    ca::RevokeReason::Superseded => "superseded: its past changes stay valid",
                    ca::RevokeReason::KeyCompromise => {
                        "key compromise: its changes are refused everywhere"
                    }
                };
                println!(
                    "revoked node {node_id}: serials {} ({why})",
                    revoked.newly_revoked.join(", ")
                );
            }
            println!(
                "  CRL number {} listing {} certificate(s)",
                revoked.crl_number,
                revoked.listed.len()
            );
            println!(
                "  CRL:         {} (give it to any node; it spreads by gossip)",
                revoked.crl_path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: CertsCmd,
    }

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from([
            "x",
            "issue",
            "--ca-dir",
            "ca",
            "--role",
            "clinic",
            "--node-id",
            "clinic-1",
            "--out",
            "o",
        ])
        .unwrap();
        match cli.cmd {
            CertsCmd::Issue {
                role,
                node_id,
                days,
                ..
            } => {
                assert_eq!(role, Role::Clinic);
                assert_eq!(node_id.as_str(), "clinic-1");
                assert_eq!(days, 365);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from([
            "x",
            "issue",
            "--ca-dir",
            "ca",
            "--role",
            "doctor",
            "--node-id",
            "a",
            "--out",
            "o"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["x", "revoke", "--ca-dir", "ca", "--node-id", "../etc"]).is_err()
        );
    }

    #[test]
    fn run_end_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        run(CertsCmd::InitCa {
            dir: ca_dir.clone(),
            name: "Test CA".into(),
        })
        .unwrap();
        let err = run(CertsCmd::InitCa {
            dir: ca_dir.clone(),
            name: "Test CA".into(),
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        let node_id = NodeId::new("hq-1").unwrap();
        let out = tmp.path().join("hq");
        run(CertsCmd::Issue {
            ca_dir: ca_dir.clone(),
            role: Role::Hq,
            node_id: node_id.clone(),
            out,
            days: 30,
            seal: StorageKeyArgs::default(),
        })
        .unwrap();
        run(CertsCmd::Revoke {
            ca_dir,
            node_id,
            serial: None,
            reason: ca::RevokeReason::KeyCompromise,
        })
        .unwrap();
    }
}
