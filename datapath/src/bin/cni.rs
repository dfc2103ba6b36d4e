//! `kubeshift-cni`: the `kubeshift` CNI plugin binary (install it as `kubeshift` in the
//! node's CNI bin dir, the name a conflist's `type` refers to).

fn main() {
    let env = std::env::vars().collect();
    let code = kubeshift_datapath::cni::main_with(&env, &mut std::io::stdin().lock(), &mut std::io::stdout().lock());
    std::process::exit(code);
}
