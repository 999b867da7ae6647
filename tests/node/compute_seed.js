// A gradserve client in Node.js from the .proto alone: computes L = (a*b + c) * f at
// a=3, b=-2, c=8, f=-2 and prints the response as JSON. Usage: node compute_seed.js HOST:PORT
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protos = path.resolve(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("gradserve/v1/gradserve.proto", {
  includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true,
});
const v1 = grpc.loadPackageDefinition(definition).gradserve.v1;
const client = new v1.GradientService(process.argv[2], grpc.credentials.createInsecure());

const scalar = (value) => ({ dtype: "DATA_TYPE_FLOAT64", shape: [], double_data: [value] });
const input = (name) => ({ name, dtype: "DATA_TYPE_FLOAT64", shape: [] });
const request = {
  request_id: "node-1",
  graph: {
    inputs: ["a", "b", "c", "f"].map(input),
    nodes: [
      { name: "d", op: "mul", inputs: ["a", "b"] },
      { name: "e", op: "add", inputs: ["d", "c"] },
      { name: "L", op: "mul", inputs: ["e", "f"] },
    ],
    outputs: ["L"],
  },
  inputs: { a: scalar(3), b: scalar(-2), c: scalar(8), f: scalar(-2) },
};

// raw_data is little-endian float64 (the contract's byte order).
const decode = (t) => Array.from({ length: t.raw_data.length / 8 },
  (_, i) => t.raw_data.readDoubleLE(8 * i));

client.Compute(request, { deadline: Date.now() + 10000 }, (err, response) => {
  if (err) {
    console.error(err.message);
    process.exit(1);
  }
  const values = (m) => Object.fromEntries(Object.entries(m).map(([k, t]) => [k, decode(t)]));
  console.log(JSON.stringify({
    request_id: response.request_id,
    outputs: values(response.outputs),
    gradients: values(response.gradients),
  }));
  client.close();
});
