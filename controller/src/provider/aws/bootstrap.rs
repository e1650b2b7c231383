//! The default user data: what an instance runs when the spec gives none.

use crate::provider::ClusterKey;

/// The default bootstrap: a tiny HTTP app like the original FastAPI one, answering `/health`
/// and naming the instance (from IMDSv2) and cluster on every other path.
pub fn default_user_data(owner: &ClusterKey, port: u16) -> String {
    format!(
        r#"#!/bin/bash
# fleetlb default bootstrap: an HTTP app like the original experiment's FastAPI one.
TOKEN=$(curl -sX PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
export INSTANCE_ID=$(curl -s -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id)
export CLUSTER_NAME='{owner}'
cat > /opt/fleetlb-app.py <<'PY'
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
iid, cluster = os.environ["INSTANCE_ID"], os.environ["CLUSTER_NAME"]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = {{"status": "ok"}}
        else:
            body = {{"message": f"Instance {{iid}} of {{cluster}} has received the request", "instance_id": iid, "cluster": cluster}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {port}), H).serve_forever()
PY
nohup python3 /opt/fleetlb-app.py >/var/log/fleetlb-app.log 2>&1 &
"#
    )
}
