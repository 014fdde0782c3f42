use loopvol::cli::{Cli, Command, LogFormat, VolumeCommand};
use loopvol::ops::static_volume;
use loopvol::server;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // One event, one line, whatever request text its fields hold (see `logsafe`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(loopvol::shared::logsafe::Stderr { ansi })
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Errors end the CLI with one clean line and exit status 1, never a backtrace: anyhow's
/// `Debug` form (what returning `Result` from `main` prints) adds one whenever
/// `RUST_BACKTRACE` is set, which is noise to an operator.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse_checked();
    match cli.command {
        Command::Serve(args) => {
            loopvol::shared::allocator::keep_freed_buffers();
            init_logging(args.log_format, &args.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(server::serve(*args, server::shutdown_signal()));
            // The stop's budget is spent: a call abandoned at the drain deadline may still
            // run on a blocking thread, and dropping the runtime would wait for it.
            rt.shutdown_timeout(std::time::Duration::from_millis(200));
            result
        }
        Command::FreezeGuard(a) => {
            init_logging(LogFormat::Text, "info");
            std::process::exit(loopvol::fs::freeze::guard_main(&a))
        }
        #[cfg(feature = "certs")]
        Command::Certs(a) => {
            init_logging(LogFormat::Text, "info");
            loopvol::multinode::cert_bootstrap::main(a)
        }
        Command::Volume(cmd) => {
            init_logging(LogFormat::Text, "warn");
            match cmd {
                VolumeCommand::Create(a) => static_volume::create(&a),
                VolumeCommand::List { pool, output } => {
                    loopvol::ops::admin::output::volume_list(&pool, output)
                }
                VolumeCommand::Delete { pool, id } => static_volume::delete(&pool, &id),
                VolumeCommand::Inspect { pool, id, output } => {
                    loopvol::ops::admin::volume::inspect(&pool.pool_dir, &id, output)
                }
            }
        }
        Command::Pool(cmd) => {
            init_logging(LogFormat::Text, "warn");
            loopvol::ops::pool_identity::main(cmd)
        }
        Command::Status(a) => {
            init_logging(LogFormat::Text, "warn");
            loopvol::ops::admin::status::run(&a)
        }
        Command::Doctor(a) => {
            init_logging(LogFormat::Text, "warn");
            std::process::exit(loopvol::ops::admin::doctor::main(&a))
        }
        Command::Csi(a) => {
            init_logging(LogFormat::Text, "warn");
            std::process::exit(loopvol::ops::admin::csi::main(a))
        }
        Command::Snapshot(a) => {
            init_logging(LogFormat::Text, "warn");
            std::process::exit(loopvol::ops::admin::snapshot::main(a))
        }
    }
}
