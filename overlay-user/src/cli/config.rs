//! `overlay config get|set`: read and write the network config at `<prefix>/config`, validated
//! the way the agent validates it (replaces `etcdctl put /coreos.com/network/config '{...}'`).

use std::{io::Read as _, path::PathBuf};

use anyhow::{Context as _, bail};

use crate::subnet::{
    NetworkConfig, Registry,
    etcd::{EtcdArgs, EtcdRegistry},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the stored config.
    Get {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print the config with flannel's defaults filled in instead of as stored.
        #[arg(long)]
        effective: bool,
    },
    /// Validate and store a config.
    Set {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The config JSON, e.g. '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'.
        #[arg(conflicts_with = "file", required_unless_present = "file")]
        json: Option<String>,
        /// Read the config JSON from this file ('-' for standard input).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match args.command {
            ConfigCommand::Get { etcd, effective } => {
                print!("{}", get(&EtcdRegistry::connect(&etcd).await?, effective).await?);
                Ok(())
            }
            ConfigCommand::Set { etcd, json, file } => {
                let json = match (json, file) {
                    (Some(j), _) => j,
                    (None, Some(p)) if p.as_os_str() == "-" => {
                        let mut s = String::new();
                        std::io::stdin()
                            .read_to_string(&mut s)
                            .context("reading the config from standard input")?;
                        s
                    }
                    (None, Some(p)) => {
                        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?
                    }
                    (None, None) => bail!("give the config JSON or --file"),
                };
                let reg = EtcdRegistry::connect(&etcd).await?;
                let cfg = set(&reg, &json).await?;
                eprintln!("stored {}: {}", reg.config_key(), cfg.to_effective_json());
                Ok(())
            }
        }
    })
}

/// The stored config (pretty-printed if it is JSON) or, with `effective`, the validated config
/// with defaults. A missing key is an error naming it.
pub async fn get(reg: &impl Registry, effective: bool) -> anyhow::Result<String> {
    let key = reg.config_key();
    let raw = reg
        .get_config()
        .await?
        .with_context(|| format!("no network config at {key}"))?;
    if effective {
        let cfg = NetworkConfig::parse(&raw).with_context(|| format!("config at {key} is invalid"))?;
        return Ok(format!("{:#}\n", cfg.to_effective_json()));
    }
    Ok(match serde_json::from_str::<serde_json::Value>(&raw) {
        Ok(v) => format!("{v:#}\n"),
        Err(_) => format!("{raw}\n"),
    })
}

/// Validate, then store the JSON as given (so fields this agent does not know survive).
pub async fn set(reg: &impl Registry, json: &str) -> anyhow::Result<NetworkConfig> {
    let cfg = NetworkConfig::parse(json)
        .and_then(|c| c.check_supported().map(|()| c))
        .context("refusing to store an invalid network config")?;
    reg.put_config(json.trim()).await?;
    Ok(cfg)
}
