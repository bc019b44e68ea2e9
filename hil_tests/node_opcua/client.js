"use strict";
// A node-opcua client, not asyncua, against the simulated PLC (hil_tests/test_opcua_node_client.py runs it).
// Usage: node client.js ENDPOINT inspect|refused. Prints one JSON object of what it found; the test judges it.
const {
  OPCUAClient,
  AttributeIds,
  BrowseDirection,
  DataType,
  MessageSecurityMode,
  SecurityPolicy,
  TimestampsToReturn,
  ClientMonitoredItem,
  makeBrowsePath,
} = require("node-opcua-client");

const NAMESPACE = "urn:bioreactor-mpc:reference-plc";
const HAS_PROPERTY = "ns=0;i=46";
const HAS_TYPE_DEFINITION = "ns=0;i=40";

async function browseNames(session, nodeId, referenceTypeId) {
  const result = await session.browse({
    nodeId,
    browseDirection: BrowseDirection.Forward,
    referenceTypeId: referenceTypeId || "HierarchicalReferences",
    includeSubtypes: true,
    resultMask: 63,
  });
  return result.references.map((reference) => ({ name: reference.browseName.name, nodeId: reference.nodeId.toString() }));
}

async function write(session, items) {
  const statuses = await session.write(
    items.map(([nodeId, dataType, value]) => ({ nodeId, attributeId: AttributeIds.Value, value: { value: { dataType, value } } })),
  );
  return statuses.map((status) => status.name);
}

async function inspect(session, ns) {
  const id = (name) => `ns=${ns};s=BR01.${name}`;
  const out = { namespaceIndex: ns, folders: {}, properties: {}, typeDefinitions: {} };
  for (const folder of await browseNames(session, `ns=${ns};s=BR01`)) {
    out.folders[folder.name] = (await browseNames(session, folder.nodeId)).map((child) => child.name).sort();
  }
  const path = await session.translateBrowsePath(makeBrowsePath("ObjectsFolder", `/${ns}:BR01/${ns}:PV/${ns}:Temperature`));
  out.temperatureByPath = path.targets.map((target) => target.targetId.toString());
  for (const name of ["PV.Temperature", "PV.Volume", "SP.FeedRate", "SP.Temperature", "Sample.Glutamine", "PV.OUR", "Status.Phase"]) {
    const properties = {};
    for (const property of await browseNames(session, id(name), HAS_PROPERTY)) {
      const value = (await session.read({ nodeId: property.nodeId, attributeId: AttributeIds.Value })).value.value;
      properties[property.name] =
        property.name === "EURange"
          ? { low: value.low, high: value.high }
          : { namespaceUri: value.namespaceUri, unitId: value.unitId, displayName: value.displayName.text };
    }
    out.properties[name] = properties;
    out.typeDefinitions[name] = (await browseNames(session, id(name), HAS_TYPE_DEFINITION)).map((t) => t.nodeId);
  }
  const build = await session.read(["i=2262", "i=2263", "i=2261", "i=2264", "i=2254"].map((nodeId) => ({ nodeId, attributeId: AttributeIds.Value })));
  out.build = build.map((dataValue) => dataValue.value.value);

  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 50,
    requestedMaxKeepAliveCount: 20,
    requestedLifetimeCount: 600,
    publishingEnabled: true,
  });
  const changes = [];
  const item = ClientMonitoredItem.create(
    subscription,
    { nodeId: id("PV.Temperature"), attributeId: AttributeIds.Value },
    { samplingInterval: 0, discardOldest: true, queueSize: 10 },
    TimestampsToReturn.Both,
  );
  item.on("changed", (dataValue) => changes.push({ value: dataValue.value.value, source: dataValue.sourceTimestamp.toISOString(), status: dataValue.statusCode.name }));
  for (let waited = 0; changes.length < 4 && waited < 5000; waited += 50) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await subscription.terminate();
  out.changes = changes;

  out.writes = {
    good: await write(session, [[id("SP.FeedRate"), DataType.Double, 1.5]]),
    outOfRange: await write(session, [[id("SP.FeedRate"), DataType.Double, 1e6]]),
    typeMismatch: await write(session, [[id("SP.FeedRate"), DataType.Float, 1.0]]),
    notWritable: await write(session, [[id("PV.Temperature"), DataType.Double, 37.0]]),
    perValue: await write(session, [
      [id("SP.FeedRate"), DataType.Double, 2.0],
      [id("SP.GlucoseRate"), DataType.Double, 1e6],
      [id("MPC.Heartbeat"), DataType.UInt32, 5],
    ]),
  };
  out.feedRateAfter = (await session.read({ nodeId: id("SP.FeedRate"), attributeId: AttributeIds.Value })).value.value;
  return out;
}

async function refused(session, ns) {
  const id = (name) => `ns=${ns};s=BR01.${name}`;
  return {
    namespaceIndex: ns,
    writes: {
      remoteDisabled: await write(session, [[id("SP.FeedRate"), DataType.Double, 1.0]]),
      heartbeat: await write(session, [[id("MPC.Heartbeat"), DataType.UInt32, 6]]),
    },
  };
}

async function main() {
  const [endpoint, step] = process.argv.slice(2);
  const client = OPCUAClient.create({
    applicationName: "bioreactor-mpc node-opcua check",
    endpointMustExist: false,
    securityMode: MessageSecurityMode.None,
    securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 0 },
  });
  await client.connect(endpoint);
  const session = await client.createSession();
  try {
    const ns = (await session.readNamespaceArray()).indexOf(NAMESPACE);
    const out = step === "refused" ? await refused(session, ns) : await inspect(session, ns);
    process.stdout.write(JSON.stringify(out) + "\n");
  } finally {
    await session.close();
    await client.disconnect();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
