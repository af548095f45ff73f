//! The `kizuna` command line: flags and dispatch, nothing else. Each
//! subcommand's flags are parsed here and handed to the module that does
//! the work ([`crate::run`], [`crate::import`], [`crate::export`],
//! [`crate::demo`], [`crate::auth`], `certs::cli`, [`crate::card::cli`]);
//! they return [`Exit`] errors that `main` renders as a message and an
//! exit code (0 ok, 1 failure, 2 bad input: config, import rows, usage).
//!
//! Nothing imports this module but `main`: it sits on top of the node.

use crate::auth::Operators;
use crate::console::Exit;
use crate::import::Encoding;
use certs::cli::StorageKeyArgs;
use clap::{Parser, Subcommand};
use crdt::Role;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kizuna",
    version,
    about = "Kizuna edge-sync node for disaster response"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the node: engine, JSON API, QUIC, mDNS, card reader (`[card]`).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage API operators (bearer tokens).
    Operator {
        #[command(subcommand)]
        cmd: OperatorCmd,
    },
    /// Resident registry.
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// Municipal data from CSV (all or nothing, resumable): shelters,
    /// family contacts, medical profiles, insurance eligibility. Formats:
    /// docs/cli.md.
    Import {
        #[arg(value_enum)]
        dataset: crate::import::DatasetName,
        #[arg(long)]
        data_dir: PathBuf,
        file: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        encoding: Encoding,
        /// Node id for a fresh data directory (it becomes an hq database).
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
    /// Municipal outputs (audited, files 0600): evacuee roster CSV,
    /// PFIF 1.4, FHIR R4 ambulance handover. Needs the node stopped; a
    /// running node serves the same through its API.
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// Documents.
    Docs {
        #[command(subcommand)]
        cmd: DocsCmd,
    },
    /// A whole mesh on loopback: CA, certs, configs, synthetic registry,
    /// hq + 2 shelters + clinic + ambulance as child processes.
    Demo {
        /// Directory for everything (default: a new temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object per node instead of `role url token`.
        #[arg(long)]
        json: bool,
        /// QUIC ports are base..base+4, HTTP ports base+100..base+104.
        #[arg(long, default_value_t = 17700)]
        base_port: u16,
        #[arg(long, default_value_t = 500)]
        households: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send the demo's family mail to this SMTP server (HOST:PORT,
        /// plaintext) instead of the built-in test server.
        #[arg(long)]
        smtp: Option<String>,
    },
    /// Municipal IC card reader (PC/SC).
    #[command(subcommand)]
    Card(crate::card::cli::CardCmd),
    /// Municipal CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: certs::cli::CertsCmd,
    },
    /// Node configuration files.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Online backup and restore of a node's data directory.
    Backup {
        #[command(subcommand)]
        cmd: BackupCmd,
    },
    /// The node's database at rest.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Revocation lists on a node.
    Crl {
        #[command(subcommand)]
        cmd: CrlCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate a config without starting the node (exit 2 on errors).
    Check {
        file: PathBuf,
        /// The role the node is meant to have (checked against its
        /// certificate; needed with --skip-files).
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Option<Role>,
        /// Check the file only, not the certificate, card profile, token and
        /// database it names (for templates).
        #[arg(long)]
        skip_files: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CrlCmd {
    /// Put the CA's revocation list (`crl.der` from `kizuna certs revoke`)
    /// into force: on a running node through its API (sessions with newly
    /// revoked peers close at once), on a stopped one into its data
    /// directory. A damaged or foreign list changes nothing.
    Load {
        #[arg(long)]
        config: PathBuf,
        /// Operator token file for a running node (default: $KIZUNA_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Write a consistent backup of a data directory into a new directory
    /// OUT, while the node runs.
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The storage key of an encrypted database (the backup stays
        /// encrypted with it).
        #[command(flatten)]
        key: StorageKeyArgs,
    },
    /// Restore a backup into a data directory that holds no database; the
    /// node takes a new incarnation at its next start.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Smallest incarnation to take (when this machine's clock cannot
        /// be trusted).
        #[arg(long)]
        incarnation_floor: Option<u32>,
        /// The storage key of an encrypted backup.
        #[command(flatten)]
        key: StorageKeyArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Encrypt a stopped node's plaintext database with its storage key,
    /// atomically (docs/operations.md, "Data at rest"); then set the same
    /// key in the node's `[storage]` config.
    Encrypt {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
    /// Rotate the storage key of a stopped node: the database (and, with
    /// --node-key, the sealed node key) moves from the current key (the
    /// --storage-key-* flags) to the key in --new-key-file, atomically;
    /// rerun after a crash. Then point `[storage]` at the new key.
    Rekey {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        key: StorageKeyArgs,
        /// The new key (from `kizuna certs keygen`), or a passphrase file.
        #[arg(long)]
        new_key_file: PathBuf,
        /// The node's sealed node.key.pem, re-sealed with the new key.
        #[arg(long)]
        node_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Add an operator and print its new token (shown once).
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// The 13-digit user ID of the operator's own card (staff card
        /// login; stored only as a keyed hash).
        #[arg(long)]
        card: Option<String>,
    },
    /// Rotate an operator's token and print the new one (valid 90 days;
    /// ends the operator's open sessions).
    Token {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Set the operator's browser password, read from the first line of
    /// standard input (at least 10 characters; ends open sessions).
    Password {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Set the PIN asked after the operator's staff card tap, read from
    /// standard input (4 to 8 digits).
    Pin {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Give the operator a new TOTP secret (the second factor on nodes
    /// that read medical data) and print it as an otpauth:// URI.
    Totp {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Remove an operator: their token stops working and their sessions end.
    Remove {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Print a one-time sign-in link path (`/ui/link/TOKEN`) that opens the
    /// node's screen signed in as the operator.
    Link {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// How long the link stays usable.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Print a whole URL with this base, e.g. http://127.0.0.1:7780
        #[arg(long)]
        base_url: Option<String>,
    },
}

/// The first line of standard input, without its line end.
fn stdin_line(what: &str) -> Result<String, Exit> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Exit::bad_input(format!("cannot read the {what} from standard input: {e}")))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Import a registry CSV (all or nothing). Format: docs/cli.md.
    Import {
        #[arg(long)]
        data_dir: PathBuf,
        file: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        encoding: Encoding,
        /// Node id for a fresh data directory (it becomes an hq database).
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExportCmd {
    /// Evacuee roster CSV (hq): everyone in a shelter now.
    Roster {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// One shelter (default: all).
        #[arg(long)]
        shelter: Option<String>,
        #[arg(long, value_enum, default_value = "utf8-bom")]
        encoding: crate::outputs::RosterEncoding,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
    /// PFIF 1.4 XML for person-finder services (hq); do-not-disclose
    /// residents are left out.
    Pfif {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Repository domain in record ids (`DOMAIN/person.ID`).
        #[arg(long, default_value = "kizuna.example.lg.jp")]
        domain: String,
        /// `author_name` of the records.
        #[arg(long, default_value = "災害対策本部 / Disaster headquarters")]
        author: String,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
    /// FHIR R4 handover Bundle of one person (ambulance, clinic, hq); the
    /// medical read is audited with the reason.
    Handover {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        person: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum DocsCmd {
    /// Save every document as standard Automerge bytes, plus index.json.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        key: StorageKeyArgs,
    },
}

pub fn main_with(cli: Cli) -> Result<(), Exit> {
    match cli.cmd {
        Cmd::Run { config } => crate::run::run(&config),
        Cmd::Operator { cmd } => {
            let token = match cmd {
                OperatorCmd::Add {
                    data_dir,
                    name,
                    card,
                } => {
                    let card = card
                        .map(|c| {
                            crate::card::UserId::normalize(&c)
                                .map_err(|e| Exit::bad_input(format!("--card: {}", e.code())))
                        })
                        .transpose()?;
                    Operators::add_with_card(&data_dir, &name, card.as_ref())?
                }
                OperatorCmd::Token { data_dir, name } => Operators::rotate(&data_dir, &name)?,
                OperatorCmd::Password { data_dir, name } => {
                    let pw = stdin_line("password")?;
                    Operators::set_password(&data_dir, &name, &pw)?;
                    "password set".to_string()
                }
                OperatorCmd::Pin { data_dir, name } => {
                    let pin = stdin_line("PIN")?;
                    Operators::set_pin(&data_dir, &name, &pin)?;
                    "PIN set".to_string()
                }
                OperatorCmd::Totp { data_dir, name } => {
                    let secret = Operators::new_totp(&data_dir, &name)?;
                    format!(
                        "otpauth://totp/Kizuna:{name}?secret={}&issuer=Kizuna&digits=6&period=30",
                        crate::auth::base32(&secret)
                    )
                }
                OperatorCmd::Remove { data_dir, name } => {
                    Operators::remove(&data_dir, &name)?;
                    format!("removed {name}")
                }
                OperatorCmd::Link {
                    data_dir,
                    name,
                    minutes,
                    base_url,
                } => {
                    let token = crate::auth::SigninLinks::issue(
                        &data_dir,
                        &name,
                        std::time::Duration::from_secs(minutes * 60),
                    )?;
                    format!(
                        "{}/ui/link/{token}",
                        base_url.as_deref().unwrap_or("").trim_end_matches('/')
                    )
                }
            };
            println!("{token}");
            Ok(())
        }
        Cmd::Registry {
            cmd:
                RegistryCmd::Import {
                    data_dir,
                    file,
                    encoding,
                    node_id,
                    key,
                },
        } => {
            crate::atrest::set_command_key_source(key.source());
            println!(
                "{}",
                crate::import::import_file(&data_dir, &file, encoding, node_id.as_deref())?
            );
            Ok(())
        }
        Cmd::Import {
            dataset,
            data_dir,
            file,
            encoding,
            node_id,
            key,
        } => {
            crate::atrest::set_command_key_source(key.source());
            println!(
                "{}",
                crate::import::import_named(
                    dataset,
                    &data_dir,
                    &file,
                    encoding,
                    node_id.as_deref()
                )?
            );
            Ok(())
        }
        Cmd::Export { cmd } => {
            use crate::outputs::Output;
            let (key, data_dir, out, what) = match cmd {
                ExportCmd::Roster {
                    data_dir,
                    out,
                    shelter,
                    encoding,
                    key,
                } => (
                    key,
                    data_dir,
                    out,
                    Output::Roster {
                        shelter_id: shelter,
                        encoding,
                    },
                ),
                ExportCmd::Pfif {
                    data_dir,
                    out,
                    domain,
                    author,
                    key,
                } => (key, data_dir, out, Output::Pfif { domain, author }),
                ExportCmd::Handover {
                    data_dir,
                    out,
                    person,
                    reason,
                    key,
                } => (
                    key,
                    data_dir,
                    out,
                    Output::Handover {
                        person_id: person,
                        reason,
                    },
                ),
            };
            crate::atrest::set_command_key_source(key.source());
            crate::export::output(&data_dir, &out, what)
        }
        Cmd::Demo {
            dir,
            json,
            base_port,
            households,
            seed,
            smtp,
        } => crate::demo::run(crate::demo::DemoArgs {
            dir,
            json,
            base_port,
            households,
            seed,
            smtp,
        }),
        Cmd::Docs {
            cmd: DocsCmd::Export { data_dir, out, key },
        } => {
            crate::atrest::set_command_key_source(key.source());
            crate::export::docs_export(&data_dir, &out)
        }
        Cmd::Certs { cmd } => certs::cli::run(cmd).map_err(Exit::from),
        Cmd::Config {
            cmd:
                ConfigCmd::Check {
                    file,
                    role,
                    skip_files,
                },
        } => {
            let report = crate::check::check(&file, role, skip_files);
            let text = report.render(&file);
            if report.ok() {
                print!("{text}");
                Ok(())
            } else {
                eprint!("{text}");
                Err(Exit::bad_input(format!(
                    "{}: {} error(s)",
                    file.display(),
                    report.errors.len()
                )))
            }
        }
        Cmd::Backup {
            cmd: BackupCmd::Create { data_dir, out, key },
        } => {
            crate::atrest::set_command_key_source(key.source());
            let c = crate::backup::create(&data_dir, &out)?;
            println!(
                "backup of {} {} written to {} in {:.1} s: {} documents, log end {}, incarnation {}, {} bytes",
                c.manifest.role,
                c.manifest.node_id,
                c.dir.display(),
                c.elapsed.as_secs_f64(),
                c.manifest.documents,
                c.manifest.log_end,
                c.manifest.incarnation,
                c.manifest.db_bytes
            );
            Ok(())
        }
        Cmd::Backup {
            cmd:
                BackupCmd::Restore {
                    from,
                    data_dir,
                    incarnation_floor,
                    key,
                },
        } => {
            crate::atrest::set_command_key_source(key.source());
            let r = crate::backup::restore(&from, &data_dir, incarnation_floor)
                .map_err(|e| Exit::bad_input(format!("{e:#}")))?;
            println!(
                "restored {} {} into {} in {:.1} s: backup incarnation {}, the node starts as incarnation {}",
                r.manifest.role,
                r.manifest.node_id,
                data_dir.display(),
                r.elapsed.as_secs_f64(),
                r.manifest.incarnation,
                r.incarnation
            );
            Ok(())
        }
        Cmd::Crl {
            cmd:
                CrlCmd::Load {
                    config,
                    token_file,
                    file,
                },
        } => {
            let msg = crate::crlcmd::load(&config, &file, token_file.as_deref())?;
            println!("{msg}");
            Ok(())
        }
        Cmd::Store {
            cmd:
                StoreCmd::Rekey {
                    data_dir,
                    key,
                    new_key_file,
                    node_key,
                },
        } => {
            let source = key.source().ok_or_else(|| {
                Exit::bad_input(
                    "give the current storage key: --storage-key-file, --storage-key-credential or --storage-key-prompt",
                )
            })?;
            let old = std::sync::Arc::new(
                certs::storagekey::read(&source).map_err(|e| Exit::bad_input(e.to_string()))?,
            );
            let new = std::sync::Arc::new(
                certs::storagekey::read(&certs::storagekey::KeySource::File(new_key_file))
                    .map_err(|e| Exit::bad_input(e.to_string()))?,
            );
            let done = crate::atrest::rekey_data_dir(&data_dir, &old, &new, node_key.as_deref())
                .map_err(|e| Exit::bad_input(format!("{e:#}")))?;
            println!(
                "{}: {} documents under the new storage key ({}); node key {}",
                done.db.display(),
                done.documents,
                if done.db_rekeyed {
                    "re-encrypted"
                } else {
                    "already done"
                },
                match (&node_key, done.node_key_resealed) {
                    (None, _) => "not given",
                    (Some(_), true) => "re-sealed",
                    (Some(_), false) => "already under the new key",
                }
            );
            Ok(())
        }
        Cmd::Store {
            cmd: StoreCmd::Encrypt { data_dir, key },
        } => {
            let source = key.source().ok_or_else(|| {
                Exit::bad_input(
                    "give the storage key: --storage-key-file, --storage-key-credential or --storage-key-prompt",
                )
            })?;
            let k = std::sync::Arc::new(
                certs::storagekey::read(&source).map_err(|e| Exit::bad_input(e.to_string()))?,
            );
            let done = crate::atrest::encrypt_data_dir(&data_dir, &k)?;
            println!(
                "encrypted {} ({} documents, {} bytes) with the {source}",
                done.db.display(),
                done.documents,
                done.bytes
            );
            println!("  now set the same key in the node's [storage] config (and seal its node key: kizuna certs seal)");
            Ok(())
        }
        Cmd::Card(_) => unreachable!("main dispatches card commands with their own exit codes"),
    }
}
