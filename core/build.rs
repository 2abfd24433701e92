//! `embed_migrations!` reads `../migrations` at compile time; a new migration folder must make
//! this crate build again, which Cargo does not know by itself.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
