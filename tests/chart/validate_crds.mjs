// Validates custom resources against the CRD schemas that @kubernetes-models/* generate from each
// project's published CRDs. Usage: node validate_crds.mjs <npm prefix> < docs.json
// Prints one JSON object per input document: {"kind", "name", "ok", "error"}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGES = {
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "keda.sh": "@kubernetes-models/keda",
};

const prefix = process.argv[2];
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of docs) {
  const [group, version] = doc.apiVersion.split("/");
  const result = { kind: doc.kind, name: doc.metadata?.name, ok: false, error: null };
  const pkg = PACKAGES[group];
  if (!pkg) {
    result.error = `no CRD models for API group ${group}`;
  } else {
    try {
      const file = join(prefix, "node_modules", pkg, group, version, `${doc.kind}.js`);
      const Model = (await import(pathToFileURL(file).href))[doc.kind];
      new Model(doc).validate();
      result.ok = true;
    } catch (error) {
      result.error = String(error.message ?? error);
    }
  }
  results.push(result);
}
process.stdout.write(JSON.stringify(results));
