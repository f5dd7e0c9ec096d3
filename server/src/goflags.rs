//! Go-style flags of the tools ferry replaces: k3d-registry-dockerd users start it with
//! `-addr :5000` or `-port 5000`, and a container image built for it passes them as its
//! command. They are rewritten to ferry's own flags before parsing (`-addr X` → `--addr X`,
//! `-port N` → `--addr 0.0.0.0:N`), and `serve` is implied when no subcommand is given.

use std::ffi::OsString;

/// Rewrites the process arguments (the program name first).
pub fn rewrite(args: Vec<OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + 1);
    let mut it = args.into_iter();
    out.extend(it.next());
    let mut rest: Vec<String> = Vec::new();
    let mut others: Vec<OsString> = Vec::new();
    let mut rewrote = false;
    let mut pending: Option<&'static str> = None;
    for arg in it {
        let Some(text) = arg.to_str().map(str::to_string) else {
            others.push(arg);
            continue;
        };
        if let Some(flag) = pending.take() {
            rest.push(go_value(flag, &text));
            continue;
        }
        match text.split_once('=') {
            Some(("-addr", v)) => {
                rest.extend(["--addr".to_string(), v.to_string()]);
                rewrote = true;
            }
            Some(("-port", v)) => {
                rest.extend(["--addr".to_string(), go_value("port", v)]);
                rewrote = true;
            }
            _ if text == "-addr" => {
                rest.push("--addr".into());
                pending = Some("addr");
                rewrote = true;
            }
            _ if text == "-port" => {
                rest.push("--addr".into());
                pending = Some("port");
                rewrote = true;
            }
            _ => rest.push(text),
        }
    }
    if rewrote && rest.first().is_none_or(|a| a.starts_with('-')) {
        out.push("serve".into());
    }
    out.extend(rest.into_iter().map(OsString::from));
    out.extend(others);
    out
}

fn go_value(flag: &str, value: &str) -> String {
    match flag {
        "port" => format!("0.0.0.0:{value}"),
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Vec<String> {
        rewrite(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn go_flags_become_ferry_flags() {
        assert_eq!(run(&["ferry", "-addr", ":5000"]), ["ferry", "serve", "--addr", ":5000"]);
        assert_eq!(run(&["ferry", "-addr=:5001"]), ["ferry", "serve", "--addr", ":5001"]);
        assert_eq!(
            run(&["ferry", "-port", "5002"]),
            ["ferry", "serve", "--addr", "0.0.0.0:5002"]
        );
        assert_eq!(
            run(&["ferry", "serve", "--config", "c.toml", "-port=5003"]),
            ["ferry", "serve", "--config", "c.toml", "--addr", "0.0.0.0:5003"]
        );
    }

    #[test]
    fn ferry_flags_pass_unchanged() {
        let args = ["ferry", "serve", "--addr", "127.0.0.1:5000", "--log-format", "json"];
        assert_eq!(run(&args), args);
        assert_eq!(run(&["ferry", "--help"]), ["ferry", "--help"]);
    }
}
