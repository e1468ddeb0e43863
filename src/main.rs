fn main() {
    std::process::exit(nbraid::cli::main());
}
