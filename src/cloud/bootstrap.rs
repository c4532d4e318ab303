//! User data for pod instances: the template's own user data runs first, then the agent
//! bootstrap installs `ec2-kubelet-agent` as a systemd service. Both travel as one MIME
//! multi-part document, which cloud-init runs part by part, in order.

/// How the bootstrap gets the agent onto the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBootstrap {
    /// Port the agent listens on.
    pub port: u16,
    /// Where to download the agent binary from; `None` when the AMI already has it at `binary`.
    pub download_url: Option<String>,
    /// Path of the agent binary on the instance.
    pub binary: String,
    /// How the agent gets its certificate; `None`: it serves plain text (`--insecure`).
    pub enrollment: Option<super::Enrollment>,
}

impl Default for AgentBootstrap {
    fn default() -> Self {
        AgentBootstrap {
            port: 8484,
            download_url: None,
            binary: "/usr/local/bin/ec2-kubelet-agent".into(),
            enrollment: None,
        }
    }
}

/// Single-quotes a value for sh.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

impl AgentBootstrap {
    /// The shell script that installs and starts the agent. The bootstrap token and the CA go
    /// into files only root reads; the agent asks the metadata service for its instance id.
    pub fn script(&self) -> String {
        let binary = quote(&self.binary);
        let mut script = String::from("#!/bin/sh\n# ec2-kubelet agent bootstrap\nset -eu\numask 077\n");
        script.push_str(&format!("mkdir -p {STATE_DIR}\n"));
        let security = match &self.enrollment {
            Some(enrollment) => {
                script.push_str(&format!(
                    "cat > {STATE_DIR}/ca.crt <<'PEM'\n{}\nPEM\nprintf '%s' {} > {STATE_DIR}/bootstrap-token\n",
                    enrollment.ca_pem.trim(),
                    quote(&enrollment.token),
                ));
                enrollment
                    .agent_flags(
                        &format!("{STATE_DIR}/ca.crt"),
                        &format!("{STATE_DIR}/bootstrap-token"),
                    )
                    .join(" ")
            }
            None => "--insecure".to_string(),
        };
        if let Some(url) = &self.download_url {
            script.push_str(&format!(
                "curl -fsSL --retry 5 -o {binary}.tmp {}\nchmod 0755 {binary}.tmp\nmv {binary}.tmp {binary}\n",
                quote(url)
            ));
        }
        script.push_str(&format!(
            "cat > /etc/systemd/system/ec2-kubelet-agent.service <<'UNIT'\n\
             [Unit]\nDescription=ec2-kubelet agent\nAfter=network-online.target\n\
             [Service]\nExecStart={} --listen 0.0.0.0:{} --state-dir {STATE_DIR} --imds-endpoint http://169.254.169.254 --log-format json {security}\n\
             Restart=always\nKillMode=process\n\
             [Install]\nWantedBy=multi-user.target\nUNIT\n\
             systemctl daemon-reload\nsystemctl enable --now ec2-kubelet-agent.service\n",
            self.binary, self.port
        ));
        script
    }
}

const STATE_DIR: &str = "/var/lib/ec2-kubelet-agent";

const BOUNDARY: &str = "==ec2-kubelet-boundary==";

/// The instance's user data: `user` (the template's or the pod's, if any) first, then the agent
/// bootstrap, as a MIME multi-part document.
pub fn user_data(user: Option<&str>, bootstrap: &AgentBootstrap) -> String {
    let mut parts = Vec::new();
    if let Some(user) = user.filter(|u| !u.trim().is_empty()) {
        let content_type = if user.starts_with("#cloud-config") {
            "text/cloud-config"
        } else {
            "text/x-shellscript"
        };
        parts.push((content_type, user.to_string()));
    }
    parts.push(("text/x-shellscript", bootstrap.script()));
    // The boundary must occur in no part: user data that contains it could otherwise end the
    // document early and drop the agent bootstrap, or add parts of its own.
    let mut boundary = BOUNDARY.to_string();
    let mut attempt = 0u32;
    while parts.iter().any(|(_, body)| body.contains(&boundary)) {
        attempt += 1;
        boundary = format!("{BOUNDARY}{attempt}");
    }
    let mut document =
        format!("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\n\n");
    for (content_type, body) in parts {
        document.push_str(&format!(
            "--{boundary}\nContent-Type: {content_type}; charset=\"utf-8\"\n\n{body}\n"
        ));
    }
    document.push_str(&format!("--{boundary}--\n"));
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_part_runs_before_the_bootstrap() {
        let document = user_data(Some("#!/bin/bash\necho user"), &AgentBootstrap::default());
        let user = document.find("echo user").unwrap();
        let agent = document.find("systemctl enable --now ec2-kubelet-agent").unwrap();
        assert!(user < agent);
        assert_eq!(document.matches(&format!("--{BOUNDARY}\n")).count(), 2);
        assert!(document.ends_with(&format!("--{BOUNDARY}--\n")));
        assert!(document.contains("--listen 0.0.0.0:8484"));
    }

    #[test]
    fn cloud_config_is_typed_and_urls_are_quoted() {
        let bootstrap = AgentBootstrap {
            port: 9000,
            download_url: Some("https://example.invalid/agent?x='1'".into()),
            ..Default::default()
        };
        let document = user_data(Some("#cloud-config\npackages: [curl]"), &bootstrap);
        assert!(document.contains("Content-Type: text/cloud-config"));
        assert!(document.contains(r"'https://example.invalid/agent?x='\''1'\'''"));
        assert!(document.contains("--listen 0.0.0.0:9000"));
        let bare = user_data(None, &AgentBootstrap::default());
        assert_eq!(bare.matches(&format!("--{BOUNDARY}\n")).count(), 1);
        assert!(bare.contains(" --insecure\n"), "{bare}");
    }

    #[test]
    fn enrollment_files_are_private_and_named_on_the_command_line() {
        let bootstrap = AgentBootstrap {
            enrollment: Some(crate::cloud::Enrollment {
                nonce: "n".into(),
                token: "ekb1.n.1.ab".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n".into(),
                url: "https://10.0.0.10:8443".into(),
            }),
            ..Default::default()
        };
        let script = bootstrap.script();
        let umask = script.find("umask 077").unwrap();
        let token = script
            .find("printf '%s' 'ekb1.n.1.ab' > /var/lib/ec2-kubelet-agent/bootstrap-token")
            .unwrap();
        assert!(umask < token, "{script}");
        assert!(script.contains("-----END CERTIFICATE-----\nPEM\n"), "{script}");
        assert!(
            script.contains("--enroll-url https://10.0.0.10:8443 --ca-file /var/lib/ec2-kubelet-agent/ca.crt --bootstrap-token-file /var/lib/ec2-kubelet-agent/bootstrap-token"),
            "{script}"
        );
        assert!(!script.contains("--insecure"), "{script}");
    }
}
