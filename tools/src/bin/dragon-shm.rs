//! The `dragon-shm` command (see the `dragon_tools` library).

fn main() {
    std::process::exit(dragon_tools::run(std::env::args_os()));
}
