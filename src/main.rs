// mimalloc: every request allocates a few small objects (task, reply, completion slot) and
// frees them on another path; glibc malloc showed up at ~10% of the daemon's CPU in `perf`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(nbraid::cli::main());
}
