//! `c1m serve --config FILE`: settings from a TOML file.
//!
//! Every key is the name of a `serve` flag without its dashes (`listen`, `interval`,
//! `api-key` or `api_key`, ...). The file is read before the command line is parsed and
//! each key becomes the flag's environment variable unless that variable is already
//! set, so one parser (clap's) checks every value, and the precedence is: flag, then
//! environment, then file, then default. An unknown key, or a value of the wrong shape,
//! stops start-up with a message naming the file and the key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::CommandFactory;

/// A config file in use, to name it in errors about its values.
pub struct Loaded {
    pub path: PathBuf,
    /// (key, flag) pairs that came from the file.
    pub keys: Vec<(String, String)>,
}

/// Finds `--config FILE` (or `C1M_CONFIG`) for `c1m serve` and loads it into the
/// environment. Returns what was loaded, if anything.
pub fn load_for(args: &[OsString]) -> anyhow::Result<Option<Loaded>> {
    if args.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return Ok(None);
    }
    let mut path = std::env::var_os("C1M_CONFIG").map(PathBuf::from);
    let mut iter = args.iter().skip(2);
    while let Some(arg) = iter.next() {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--config" {
            path = iter.next().map(PathBuf::from);
        } else if let Some(value) = arg.strip_prefix("--config=") {
            path = Some(PathBuf::from(value));
        }
    }
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let settings = parse(&path, &text)?;
    let mut keys = Vec::new();
    for (key, (flag, env, value)) in settings {
        if std::env::var_os(&env).is_none() {
            // Single-threaded: nothing else reads the environment yet.
            std::env::set_var(&env, value);
        }
        keys.push((key, flag));
    }
    Ok(Some(Loaded { path, keys }))
}

/// Maps each key of the file to (flag, environment variable, value as text).
fn parse(path: &Path, text: &str) -> anyhow::Result<BTreeMap<String, (String, String, String)>> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let cli = crate::Cli::command();
    let serve = cli
        .find_subcommand("serve")
        .context("the serve command is missing")?;
    let flags: BTreeMap<String, String> = serve
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let env = a.get_env()?.to_str()?.to_string();
            Some((long, env))
        })
        .collect();
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if flag == "config" {
            bail!(
                "{}: key `config`: a config file cannot name another one",
                path.display()
            );
        }
        let Some(env) = flags.get(&flag) else {
            let known: Vec<&str> = flags.keys().map(String::as_str).collect();
            bail!(
                "{}: unknown key `{key}`; the keys are the serve flags: {}",
                path.display(),
                known.join(", ")
            );
        };
        let text = match &value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let parts: Option<Vec<String>> = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect();
                parts
                    .with_context(|| {
                        format!(
                            "{}: key `{key}`: expected an array of strings",
                            path.display()
                        )
                    })?
                    .join(",")
            }
            other => bail!(
                "{}: key `{key}`: expected a string, number, boolean or array of strings, not {}",
                path.display(),
                other.type_str()
            ),
        };
        out.insert(key.clone(), (flag, env.clone(), text));
    }
    Ok(out)
}

/// Rewrites a command-line error caused by a value from the file so it names the key.
pub fn explain(loaded: &Loaded, message: &str) -> Option<String> {
    loaded.keys.iter().find_map(|(key, flag)| {
        message.contains(&format!("--{flag} ")).then(|| {
            format!(
                "{}: key `{key}`: {}",
                loaded.path.display(),
                message.trim_start_matches("error: ").trim_end()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_flags_and_unknown_keys_are_named() {
        let path = Path::new("c1m.toml");
        let map = parse(
            path,
            "listen = \"127.0.0.1:0\"\nmax_connections = 5\necho = true\nallowed-origins = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(map["listen"].1, "C1M_LISTEN");
        assert_eq!(
            map["max_connections"],
            (
                "max-connections".into(),
                "C1M_MAX_CONNECTIONS".into(),
                "5".into()
            )
        );
        assert_eq!(map["echo"].2, "true");
        assert_eq!(map["allowed-origins"].2, "a,b");
        let err = parse(path, "lisen = 1\n").unwrap_err().to_string();
        assert!(err.contains("unknown key `lisen`"), "{err}");
        let err = parse(path, "listen = { a = 1 }\n").unwrap_err().to_string();
        assert!(err.contains("key `listen`"), "{err}");
    }
}
