// The migrations are embedded by `sqlx::migrate!`: a new or edited one must rebuild quill.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
