//! The `shoal` binary: run, check, demo, and the admin client commands.

/// jemalloc, for its per-thread caches of every size a request allocates (see Cargo.toml).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in the environment is
/// read after them and wins). `tcache_nslots_small_min:64`: a thread keeps at least 64 freed
/// objects of each small size for its next allocations, where the default keeps 20 of a size
/// with few objects per slab, such as a request's 4 KB exchange box. With more requests in
/// flight than that, every twentieth box or so went back to its slab, emptied it and had a new
/// slab made for it (6,500 instructions each: 4.6 % of a proxied request's under `wrk -c64`).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"tcache_nslots_small_min:64".as_ptr());

/// The C string jemalloc reads its options from (`const char *malloc_conf`).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, immutable for the life of the program.
unsafe impl Sync for MallocConf {}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SHOAL_COMMIT"), ")"),
    about = "A leaderless HTTP load-balancing reverse proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Admin API of the peer to ask.
    #[arg(
        long,
        env = "SHOAL_ADMIN",
        default_value = "http://127.0.0.1:9901",
        global = true
    )]
    admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "SHOAL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run one peer.
    Run {
        /// The config file.
        #[arg(short, long, env = "SHOAL_CONFIG", default_value = "config/shoal.toml")]
        config: PathBuf,
        /// Last resort when a majority of voters lost their disks: start a new membership epoch
        /// with this peer as the only voter, from its own last state.
        #[arg(long)]
        force_new_cluster: bool,
    },
    /// Validate a config file: a summary and exit 0, or every problem and exit 2.
    Check {
        /// The config file.
        #[arg(short, long, env = "SHOAL_CONFIG", default_value = "config/shoal.toml")]
        config: PathBuf,
    },
    /// Run a local cluster of peers and demo backends in one process, on loopback.
    Demo {
        /// How many peers (1..=9).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
        peers: u16,
        /// How many demo backends (1..=50).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
        backends: u16,
    },
    /// One demo backend (answers every path with its name): for containers and tests.
    DemoBackend {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// The name it answers with.
        #[arg(long, default_value = "backend")]
        name: String,
    },
    /// Make certificates: a private CA for the cluster, and peer/proxy certificates it signs.
    Cert {
        #[command(subcommand)]
        op: CertOp,
    },
    /// Show or change the agreed backend pool of a service (`default` unless --service).
    Pool {
        #[command(subcommand)]
        op: PoolOp,
        /// The service whose pool to show or change.
        #[arg(long, global = true, default_value = "default")]
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the services; `apply` commits a config file's definitions, `remove` drops one.
    Services {
        #[command(subcommand)]
        op: Option<ServicesOp>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The status of the peer at --admin: consensus, members, the pool with local views.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Exit 0 when the peer at --admin is ready (GET /readyz answers 200), else 1.
    Health {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The peer table seen by the peer at --admin; `add`/`remove` change the agreed membership.
    Peers {
        #[command(subcommand)]
        op: Option<PeersOp>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a completion script: `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum CertOp {
    /// Write DIR/ca.pem and DIR/ca-key.pem (mode 0600): the cluster's private CA.
    Ca {
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Do nothing (exit 0) when the files exist already: for init containers.
        #[arg(long)]
        if_missing: bool,
    },
    /// Write DIR/ID.pem and DIR/ID-key.pem signed by the CA: ID (the node id) as a DNS name plus
    /// the extra names; valid as server and client certificate ([cluster.tls], [proxy.tls]).
    Issue {
        /// The node id the certificate names (as a DNS name).
        id: String,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// An extra DNS name (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// An extra IP address (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Do nothing (exit 0) when the files exist already: for init containers.
        #[arg(long)]
        if_missing: bool,
    },
}

#[derive(Subcommand)]
enum PeersOp {
    /// List the peers this peer sees (the default).
    List,
    /// Add a member: a voter (a new membership epoch), or with --learner a recorded learner.
    /// Answers once committed.
    Add {
        /// The new member's node id.
        id: String,
        /// Its cluster address (host:port), as the other peers dial it.
        addr: String,
        /// Record a learner (routes and learns, never in a quorum) instead of a voter.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member (a voter's removal starts a new membership epoch). Answers once
    /// committed.
    Remove {
        /// The member's node id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ServicesOp {
    /// List the agreed services with their backends.
    List,
    /// Commit the [[services]] definitions of a config file (not their backends) as one change.
    Apply {
        /// The config file whose services to commit.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Remove a service and its pool.
    Remove {
        /// The service's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum PoolOp {
    /// List the agreed pool.
    List,
    /// Add a backend (host:port or https://host:port).
    Add {
        /// host:port or https://host:port.
        addr: String,
        /// Relative weight, 1..=1000.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// The backend's id (default: its address).
        #[arg(long)]
        id: Option<String>,
        /// "http1" (default) or "h2" (HTTP/2 to the backend: h2c, or ALPN h2 for https://).
        #[arg(long)]
        protocol: Option<String>,
    },
    /// Remove a backend.
    Remove {
        /// The backend's id.
        id: String,
    },
    /// Stop sending new requests to a backend; in-flight ones finish.
    Drain {
        /// The backend's id.
        id: String,
    },
    /// Send requests to a drained backend again.
    Undrain {
        /// The backend's id.
        id: String,
    },
    /// Set a backend's weight (1..=1000).
    Weight {
        /// The backend's id.
        id: String,
        /// The new weight, 1..=1000.
        weight: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config: path,
            force_new_cluster,
        } => {
            let mut config = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            config.node.force_new_cluster = force_new_cluster;
            let log = shoal::ops::telemetry::init_logging(&config.log);
            serve(shoal::app::run(config, path, log))
        }
        Command::Demo { peers, backends } => {
            serve(shoal::cli::demo::run(peers as usize, backends as usize))
        }
        Command::DemoBackend { listen, name } => serve(shoal::cli::demo::run_backend(listen, name)),
        Command::Cert { op } => cert(op),
        Command::Pool { op, service, admin } => client_command(
            admin,
            pool_request(op, &service),
            shoal::cli::client::print_pool,
        ),
        Command::Services { op, admin } => services(op.unwrap_or(ServicesOp::List), admin),
        Command::Status { admin } => client_command(
            admin,
            shoal::cli::client::Request::get("/status"),
            shoal::cli::client::print_status,
        ),
        Command::Health { admin } => {
            let quiet = AdminArgs {
                json: false,
                ..admin
            };
            client_command(quiet, shoal::cli::client::Request::get("/readyz"), |_| {
                "ready\n".into()
            })
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Peers { op, admin } => peers(op.unwrap_or(PeersOp::List), admin),
    }
}

/// The config at `path`, or its problems printed (each naming its key) and exit code 2.
fn load_config(path: &std::path::Path) -> Result<shoal::config::Config, ExitCode> {
    shoal::config::load(path).map_err(|e| {
        eprintln!("{}: invalid config", path.display());
        for p in &e.0 {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    })
}

/// `shoal check`: ok and a summary, or every problem (exit 2).
fn check(path: &std::path::Path) -> ExitCode {
    match load_config(path) {
        Ok(c) => {
            println!("{}: ok", path.display());
            println!("{}", c.summary());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `shoal cert ca|issue`.
fn cert(op: CertOp) -> ExitCode {
    let done = match op {
        CertOp::Ca {
            out,
            days,
            force,
            if_missing,
        } => {
            let have = ["ca.pem", "ca-key.pem"].map(|f| out.join(f));
            if if_missing && have.iter().all(|p| p.exists()) {
                println!("kept {} (exists)", have[0].display());
                return ExitCode::SUCCESS;
            }
            shoal::cli::cert::make_ca(&out, days, force)
        }
        CertOp::Issue {
            id,
            ca,
            out,
            dns,
            ip,
            days,
            force,
            if_missing,
        } => {
            let have = [format!("{id}.pem"), format!("{id}-key.pem")].map(|f| out.join(f));
            if if_missing && have.iter().all(|p| p.exists()) {
                println!("kept {} (exists)", have[0].display());
                return ExitCode::SUCCESS;
            }
            let names = shoal::cli::cert::Names { dns, ips: ip };
            shoal::cli::cert::issue(&id, &ca, &out, &names, days, force)
        }
    };
    match done {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(
            e @ (shoal::cli::cert::CertError::Exists(_) | shoal::cli::cert::CertError::Bad(..)),
        ) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The admin request of a `shoal pool` command, for service `service`.
fn pool_request(op: PoolOp, service: &str) -> shoal::cli::client::Request {
    let base = if service == "default" {
        "/pool".to_string()
    } else {
        format!("/services/{}/pool", seg(service))
    };
    match op {
        PoolOp::List => shoal::cli::client::Request::get(&base),
        PoolOp::Add {
            addr,
            weight,
            id,
            protocol,
        } => {
            let mut body = serde_json::json!({ "addr": addr, "weight": weight });
            if let Some(id) = id {
                body["id"] = id.into();
            }
            if let Some(p) = protocol {
                body["protocol"] = p.into();
            }
            shoal::cli::client::Request::with_body("POST", &format!("{base}/backends"), body)
        }
        PoolOp::Remove { id } => {
            shoal::cli::client::Request::new("DELETE", &format!("{base}/backends/{}", seg(&id)))
        }
        PoolOp::Drain { id } => {
            shoal::cli::client::Request::new("POST", &format!("{base}/backends/{}/drain", seg(&id)))
        }
        PoolOp::Undrain { id } => shoal::cli::client::Request::new(
            "POST",
            &format!("{base}/backends/{}/undrain", seg(&id)),
        ),
        PoolOp::Weight { id, weight } => shoal::cli::client::Request::with_body(
            "PUT",
            &format!("{base}/backends/{}", seg(&id)),
            serde_json::json!({ "weight": weight }),
        ),
    }
}

/// `shoal services [list|apply|remove]`.
fn services(op: ServicesOp, admin: AdminArgs) -> ExitCode {
    match op {
        ServicesOp::List => client_command(
            admin,
            shoal::cli::client::Request::get("/services"),
            shoal::cli::client::print_services,
        ),
        ServicesOp::Apply { config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let services: Vec<serde_json::Value> = config
                .services
                .iter()
                .map(|s| serde_json::json!({ "name": s.name, "def": s.def }))
                .collect();
            client_command(
                admin,
                shoal::cli::client::Request::with_body(
                    "PUT",
                    "/services",
                    serde_json::json!({ "services": services }),
                ),
                shoal::cli::client::print_services,
            )
        }
        ServicesOp::Remove { name } => client_command(
            admin,
            shoal::cli::client::Request::new("DELETE", &format!("/services/{}", seg(&name))),
            |v| {
                format!(
                    "removed service {} (pool version {})\n",
                    v["removed"].as_str().unwrap_or("?"),
                    v["version"]
                )
            },
        ),
    }
}

/// `shoal peers [list|add|remove]`.
fn peers(op: PeersOp, admin: AdminArgs) -> ExitCode {
    match op {
        PeersOp::List => client_command(
            admin,
            shoal::cli::client::Request::get("/peers"),
            shoal::cli::client::print_peers,
        ),
        PeersOp::Add { id, addr, learner } => client_command(
            admin,
            shoal::cli::client::Request::with_body(
                "POST",
                "/peers",
                serde_json::json!({
                    "id": id,
                    "addr": addr,
                    "role": if learner { "learner" } else { "voter" },
                }),
            ),
            shoal::cli::client::print_membership,
        ),
        PeersOp::Remove { id } => client_command(
            admin,
            shoal::cli::client::Request::new("DELETE", &format!("/peers/{}", seg(&id))),
            shoal::cli::client::print_membership,
        ),
    }
}

/// A backend id as a path segment (discovered ids hold a slash).
fn seg(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

fn client_command(
    admin: AdminArgs,
    req: shoal::cli::client::Request,
    print: fn(&serde_json::Value) -> String,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(shoal::cli::client::call(
        &admin.admin,
        admin.token.as_deref(),
        req,
    )) {
        Ok((status, body)) if status < 300 => {
            if admin.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_default()
                );
            } else {
                print!("{}", print(&body));
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let reason = body["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            eprintln!("error: {} answered {status}: {reason}", admin.admin);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.starts_with("bad --admin") { 2 } else { 1 })
        }
    }
}

/// The control plane's runtime (cluster, admin, probes). Traffic runs on the worker threads
/// that `shoal run` starts per `proxy.workers`, each with a runtime of its own.
/// Run a long-lived command on the control runtime: exit 0 when it ends well, 1 with its error.
fn serve(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("shoal-ctl")
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "shoal", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
