//! A WASI command: a valid component, but not one an HTTP host can call.

fn main() {
    println!("this component has no wasi:http/incoming-handler export");
}
