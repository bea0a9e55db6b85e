mod devices;

fn main() {}
