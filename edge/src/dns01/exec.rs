//! The `exec` provider, the escape hatch for any DNS: a program run as
//! `PROGRAM [ARGS...] present|cleanup NAME. VALUE`, lego's exec convention, with exit
//! status 0 meaning done.
//!
//! Invariants: the program is started directly (no shell) with an argv holding no secret;
//! its environment is only `PATH` and the configured variables, where secrets belong; its
//! stdin is empty, its stderr goes into the error, and it is killed when it outlives
//! [`RUN_TIMEOUT`] or the order it serves.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use labcore::{Env, Secret};

use super::DnsError;

/// Time the program has for one action.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// PATH when the edge runs without one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// exec settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exec {
    command: Vec<String>,
    env: BTreeMap<String, Secret>,
    path: String,
}

impl Exec {
    /// Checks `command` and takes PATH from the edge's environment.
    pub(crate) fn resolve(
        command: &[String],
        env: BTreeMap<String, Secret>,
        process: &Env,
    ) -> Result<Exec, String> {
        match command.first() {
            None => return Err("is missing: the program to run, then its first arguments".into()),
            Some(program) if program.is_empty() => return Err("names an empty program".into()),
            Some(_) => {}
        }
        Ok(Exec {
            command: command.to_vec(),
            env,
            path: process.get("PATH").unwrap_or(DEFAULT_PATH).to_owned(),
        })
    }

    fn error(&self, message: impl Into<String>) -> DnsError {
        DnsError {
            provider: "exec",
            target: self.command[0].clone(),
            message: message.into(),
        }
    }

    /// Runs the program for `action` on TXT `name` = `value`.
    pub(crate) async fn run(&self, action: &str, name: &str, value: &str) -> Result<(), DnsError> {
        let mut child = tokio::process::Command::new(&self.command[0]);
        child
            .args(&self.command[1..])
            .arg(action)
            .arg(format!("{}.", name.trim_end_matches('.')))
            .arg(value)
            .env_clear()
            .env("PATH", &self.path)
            .envs(self.env.iter().map(|(k, v)| (k, v.expose())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned = child
            .spawn()
            .map_err(|e| self.error(format!("{action}: starting it: {e}")))?;
        let output = tokio::time::timeout(RUN_TIMEOUT, spawned.wait_with_output())
            .await
            .map_err(|_| {
                self.error(format!(
                    "{action}: still running after {RUN_TIMEOUT:?}; killed"
                ))
            })?
            .map_err(|e| self.error(format!("{action}: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .trim()
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(self.error(format!("{action} {name}: {}: {tail}", output.status)));
        }
        tracing::info!(name, action, program = %self.command[0], "DNS-01 hook done");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn the_program_gets_the_action_name_and_value_as_arguments_and_secrets_only_in_its_environment()
     {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hook");
        let out = dir.path().join("calls");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$* token=$DNS_TOKEN home=${{HOME:-unset}}\" >> {}\n[ \"$3\" = fail. ] && {{ echo 'zone locked' >&2; exit 3; }}\nexit 0\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = BTreeMap::from([("DNS_TOKEN".to_owned(), Secret::from("s3cret"))]);
        let command = vec![
            script.display().to_string(),
            "--zone=test.example".to_owned(),
        ];
        let exec = Exec::resolve(&command, env, &Env::default()).unwrap();
        exec.run("present", "_acme-challenge.test.example", "v1")
            .await
            .unwrap();
        exec.run("cleanup", "_acme-challenge.test.example", "v1")
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "--zone=test.example present _acme-challenge.test.example. v1 token=s3cret home=unset\n\
             --zone=test.example cleanup _acme-challenge.test.example. v1 token=s3cret home=unset\n"
        );
        let err = exec
            .run("present", "fail", "v")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("DNS provider exec ("), "{err}");
        assert!(err.contains("exit status: 3: zone locked"), "{err}");
        assert!(Exec::resolve(&[], BTreeMap::new(), &Env::default()).is_err());
    }
}
