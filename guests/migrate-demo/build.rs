fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    println!("cargo:rustc-link-arg=-T{}/link.ld", dir.display());
    println!("cargo:rerun-if-changed=../link.ld");
}
