fn main() {
    print!("{}", fleetlb_crds::crd_yaml());
}
