//! `dragon-config`: edits the Dragon configuration file (libfabric library and provider).
//! See `dragon_transport::config` for the commands, the keys and the JSON file.

fn main() {
    dragon_transport::logging::init_stderr();
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(dragon_transport::config::config_main(&args));
}
