//! `cosilo federation`: provision a federation declared in one file (`docs/FEDERATION.md`).

use std::path::PathBuf;

use cosilo_appliance::kit;
use cosilo_provision::{site, Declaration, Operator};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum FederationCommand {
    /// Operator: check the declaration and create the operator folder (the federation's CA, the
    /// revocation list, and for an external Mosquitto its certificate and configuration).
    Init {
        /// The declaration (federation.toml).
        declaration: PathBuf,
        /// The operator folder to create.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Site or observer: make this member's keys here (they never leave this folder) and write
    /// DIR/request.toml for the operator.
    Request {
        /// The declaration (federation.toml).
        declaration: PathBuf,
        /// This member's id, as the declaration names it.
        #[arg(long)]
        id: String,
        /// This member's folder.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Operator: check a request, sign its certificate, add it to the roster and write its kit
    /// (the folder is printed); every member's kit gets the new roster.
    Admit {
        /// The member's request.toml.
        request: PathBuf,
        /// The operator folder.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Site or observer: check the kit against this member's keys and install it (again after a
    /// member joined or left, for the new roster).
    Install {
        /// The kit folder the operator sent.
        kit: PathBuf,
        /// This member's folder (where `request` made the keys).
        #[arg(long)]
        dir: PathBuf,
        /// The site's store folder (default: DIR/store).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Operator: revoke a member's certificate, drop it from the roster and the broker's ACL.
    Remove {
        /// The member's id.
        id: String,
        /// The operator folder.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Operator: list the members.
    Members {
        /// The operator folder.
        #[arg(long)]
        dir: PathBuf,
    },
    /// One machine, for a trial: init, request, admit and install every declared member under
    /// DIR (DIR/operator, DIR/{id}), each member's keys made in its own folder.
    Local {
        /// The declaration (federation.toml).
        declaration: PathBuf,
        /// The folder to lay the federation out in.
        #[arg(long)]
        dir: PathBuf,
    },
}

pub(crate) fn run(cmd: FederationCommand) -> anyhow::Result<()> {
    match cmd {
        FederationCommand::Init { declaration, dir } => {
            // Every site's configuration must be one the daemon accepts before a CA exists.
            let decl = Declaration::load(&declaration)?;
            for s in &decl.site {
                kit::site_config(&decl, &s.id)?;
            }
            let op = Operator::init(&declaration, &dir)?;
            let d = op.declaration();
            println!(
                "federation {}: {} site(s), {} observer(s), security {:?}; CA in {}",
                d.federation.name,
                d.site.len(),
                d.observer.len(),
                d.federation.security,
                dir.display()
            );
            if op.mosquitto_conf_path().exists() {
                println!(
                    "Mosquitto configuration: {}",
                    op.mosquitto_conf_path().display()
                );
            }
        }
        FederationCommand::Request {
            declaration,
            id,
            dir,
        } => {
            let decl = Declaration::load(&declaration)?;
            let path = site::request(&decl, &id, &dir)?;
            println!("{}", path.display());
        }
        FederationCommand::Admit { request, dir } => {
            let mut op = Operator::open(&dir)?;
            let kit = kit::admit(&mut op, &request)?;
            println!("{}", kit.display());
        }
        FederationCommand::Install { kit, dir, store } => {
            match kit::install(&kit, &dir, store.as_deref())? {
                Some(cfg) => println!("{}", cfg.display()),
                None => println!("{}", dir.display()),
            }
        }
        FederationCommand::Remove { id, dir } => {
            let mut op = Operator::open(&dir)?;
            op.remove(&id)?;
            println!(
                "{id} removed: certificate revoked, off the roster; members install their kits again"
            );
        }
        FederationCommand::Members { dir } => {
            let op = Operator::open(&dir)?;
            for m in op.members() {
                println!(
                    "{}\t{:?}\tserial {}\t{}",
                    m.id,
                    m.role,
                    m.serial,
                    if m.revoked { "revoked" } else { "active" }
                );
            }
        }
        FederationCommand::Local { declaration, dir } => {
            let fed = kit::provision_local(&declaration, &dir)?;
            for (id, folder) in &fed.sites {
                println!("{id}\t{}", folder.join("site.toml").display());
            }
        }
    }
    Ok(())
}
